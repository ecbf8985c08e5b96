"""Data layer: webdataset shards -> DALI (decode/resize/normalise) + tokenizer -> VLMBatch.

* ``batch``         the VLMBatch contract
* ``shards``        build/index/read webdataset shards (``tools/prepare_data.py``)
* ``tokenizer``     Tokenizer (HF ``tokenizer.json`` + special tokens), ``train_bpe``
* ``samples``       token layout per arch, collation into VLMBatch
* ``dali_pipeline`` the DALI graphs
* ``tiling``        Mllama image tiles (grid choice as transformers' processor, the DALI piece)
* ``encoder_weights`` the data router's per-sample ``encoder_weights`` (manifest -> shards -> batch, checks)
* ``dali_loader``   DaliLoader (data-parallel, resumable), ``build_loaders(cfg, ...)``
* ``synthetic``     the seeded shapes dataset (``tools/make_synthetic_dataset.py``)

Submodules are imported on use: ``import megatron_vlm.data`` pulls in neither DALI nor tokenizers.
"""
