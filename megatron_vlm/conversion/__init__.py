"""Checkpoint conversion Megatron <-> HuggingFace (``tools/convert_checkpoint.py``).

Subcommands (flags: ``megatron_vlm/conversion/cli.py``)::

    import-hf  --hf-path HF --save MCORE [--tensor-model-parallel-size T --pipeline-model-parallel-size P
               --expert-model-parallel-size E --dtype float32|bfloat16 --arch A --overwrite]
               [--vision-path [NAME=]CLIP_OR_SIGLIP ...]  # warm start (HF = LlamaForCausalLM); repeat: several encoders
    export-hf  --load MCORE --hf-path HF [--dtype ... --tokenizer-path TOK --max-shard-size 5GB --overwrite]
    verify     --hf-path HF --load MCORE [--tensor-model-parallel-size T --tolerance 1e-4 --generate N]

Families (one module each, declarative key maps built from the shared ops in ``mapping.py``):

==============================================  ===================  =========================
HF                                              our arch             module
==============================================  ===================  =========================
LlavaForConditionalGeneration (CLIP + Llama)    joint_decoder        archs/joint_decoder/hf_llava.py
MllamaForConditionalGeneration                  cross_attention      archs/cross_attention/hf_mllama.py
LlamaForCausalLM + CLIPVisionModel /            any (joint_decoder,  warm_start.py
SiglipVisionModel (warm start, import only)     cross_attention, ..)
==============================================  ===================  =========================

Design choices:

* **Key maps** are lists of ``Pair(megatron key, HF keys, op)`` generated from ``Rule`` templates;
  fused QKV (rows per query group), cross-attention fused KV, SwiGLU ``[gate; up]``, vocab padding
  and reshapes are ops shared by every family. Maps are written in the global TP=1/PP=1 layout,
  which is what megatron's dist checkpoints store; megatron (re)shards on load.
* **TP/PP/EP on import**: one process builds the TP=1 model once, fills it tensor by tensor, and
  writes a layout-agnostic dist checkpoint; the target layout is validated (heads/groups/vocab/layers
  divisible, EP only where the arch has experts) and recorded in ``iter_0000000/config.yaml``, so
  ``pretrain_vlm.py --config SAVE/iter_0000000/config.yaml --load SAVE`` starts at that layout (the
  checkpoint is model-only: the optimizer starts fresh). **Export** reads any TP/PP checkpoint
  (from import or from training, with optimizer state, local or TE key names) one global tensor at
  a time straight from the dist checkpoint, no model built. **Verify** runs our model at
  ``--tensor-model-parallel-size`` (spawning the ranks itself when started as one process).
* **Vocabulary**: padded to ``--make-vocab-size-divisible-by`` (128, like Megatron-LM, so
  ``pretrain_vlm.py``'s tokenizer padding agrees); the true size is kept in
  ``model.language.unpadded_vocab_size`` and export trims to it.
* **LLaVA vision tower**: our CLIP tower is built as deep as ``vision_feature_layer`` selects
  (-2: all but the last layer, like megatron-LM's LLaVA); the unused last layer(s) and
  ``post_layernorm`` are *carried* in ``iter_*/hf_source/carried.safetensors`` with the original
  ``config.json`` so export restores the folder bit for bit. A checkpoint without them (e.g.
  after training) exports an equivalent HF config (``vision_feature_layer=-1``, identity
  ``post_layernorm``).
* **Mllama vision tower**: carried as a wrapped HF module (``model.vision.hf_config``,
  ``megatron_vlm/models/hf_vision.py``): transformers' ``MllamaVisionModel`` inside our model,
  tensors renamed only; images are single tiles. The text decoder (cross-attention layers, gates,
  q/k norms, +8 embedding rows) and the projector (``affine``) are ours.
* **Streaming**: HF tensors are read one at a time with plain file I/O; safetensors are written
  from a precomputed plan, header first, tensor by tensor; outputs appear atomically (temp folder
  + rename), never over a non-empty folder without ``--overwrite``.
"""

from megatron_vlm.conversion.mapping import ConversionError  # noqa: F401
