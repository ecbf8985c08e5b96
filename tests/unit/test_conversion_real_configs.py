"""Real-model configs the converter used to refuse: GeGLU decoders, patch grids that floor, and a
cross-attention cadence too coarse for the text model.

* GeGLU (``hidden_act`` gelu / gelu_pytorch_tanh; gelu_new = the tanh formula): a tiny LLaVA whose
  Llama has ``gelu_pytorch_tanh`` imports, ``verify`` matches transformers' logits (<= 5e-6), and
  the export writes the same ``hidden_act`` (carried config and one derived from ours); a warm start
  from a Llama with exact ``gelu`` gives transformers' text logits. Others: one line.
* Floored patch grid (SigLIP-so400m 384 px / 14 px = 27 x 27): the same LLaVA has a CLIP tower of
  30 px images in 4 px patches (7 x 7, the last 2 px unused) and the warm start a 30 / 4 SigLIP;
  features and logits match transformers, and the training side (config, data layout, model
  features, FLOPs) counts the same 49 image tokens as transformers' LLaVA.
* ``--cross-attention-every 4`` with a 2-layer Llama: one line naming the smallest model for that
  cadence and the allowed values.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
import torch

from megatron_vlm.config import ConfigError, validate
from megatron_vlm.conversion import tiny
from megatron_vlm.testing.distributed import run_distributed

TOL = 5e-6
IMAGE, PATCH = 30, 4  # 7 x 7 patches; 30 is not a multiple of 4


def _save_llava_geglu(path: Path) -> Path:
    from transformers import LlavaForConditionalGeneration

    cfg = tiny.llava_config(image_size=IMAGE, patch=PATCH)
    cfg.text_config.hidden_act = "gelu_pytorch_tanh"
    torch.manual_seed(0)
    tiny.randomize_(LlavaForConditionalGeneration(cfg), 0).save_pretrained(str(path), max_shard_size="200KB")
    return path


def _save_llama_gelu_and_siglip(root: Path) -> tuple[Path, Path]:
    from transformers import LlamaConfig, LlamaForCausalLM, SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(0)
    tiny.randomize_(LlamaForCausalLM(LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=300, max_position_embeddings=128, rms_norm_eps=1e-5,
        hidden_act="gelu"))).save_pretrained(str(root / "llama_gelu"))
    tiny.randomize_(SiglipVisionModel(SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        image_size=IMAGE, patch_size=PATCH))).save_pretrained(str(root / "siglip"))
    return root / "llama_gelu", root / "siglip"


def _real_configs(llava: str, llama: str, siglip: str, work: str) -> dict:
    """One process: import + verify + export of the GeGLU / 30-px LLaVA; warm start Llama(gelu) +
    SigLIP(30 px); training-side token counts."""
    import shutil

    from transformers import LlamaForCausalLM, LlavaForConditionalGeneration, SiglipVisionModel

    from megatron_vlm.conversion.convert import export_hf, import_hf
    from megatron_vlm.conversion.verify import load_megatron, verify
    from megatron_vlm.data.batch import ModelInputs
    from megatron_vlm.data.mock import random_batch
    from megatron_vlm.training.flops import iteration_flops

    work = Path(work)
    out = {}
    import_hf(llava, str(work / "mcore"))
    out["verify"] = verify(llava, str(work / "mcore"), seed=1, tolerance=TOL).__dict__
    export_hf(str(work / "mcore"), str(work / "back"))
    shutil.copytree(work / "mcore", work / "bare")  # no carried HF config: exported from ours
    shutil.rmtree(work / "bare" / "iter_0000000" / "hf_source")
    export_hf(str(work / "bare"), str(work / "derived"))
    out["derived_verify"] = verify(str(work / "derived"), str(work / "bare"), seed=1, tolerance=TOL).__dict__
    out["hidden_act"] = {name: json.loads((work / name / "config.json").read_text())["text_config"]["hidden_act"]
                         for name in ("back", "derived")}

    cfg, model = load_megatron(str(work / "mcore"))
    hf = LlavaForConditionalGeneration.from_pretrained(llava).eval()
    batch = random_batch(cfg.model, 2, 0, image_token_id=cfg.model.image_token_id)
    with torch.no_grad():
        feats = model.encode_images(batch.images)
        hf_feats = hf.get_image_features(pixel_values=batch.images[:, 0])
        hf_feats = hf_feats.pooler_output if hasattr(hf_feats, "pooler_output") else hf_feats
        if isinstance(hf_feats, (list, tuple)):  # one tensor per image
            hf_feats = torch.stack([f.reshape(-1, f.shape[-1]) for f in hf_feats])
        hf_feats = hf_feats.reshape(2, -1, hf_feats.shape[-1])
        model(batch.model_inputs())
    out["counts"] = {
        "config": cfg.model.num_image_tokens, "hf_image_seq_length": hf.config.image_seq_length,
        "layout": int((batch.modality_ids[0] == 0).sum()), "model_features": feats.shape[2],
        "hf_features": hf_feats.shape[1],
        "vision_seq": cfg.model.vision_encoder.seq_length, "activation": cfg.model.language.activation}
    out["features_diff"] = (feats[:, 0] - hf_feats).abs().max().item()
    out["flops_positive"] = iteration_flops(cfg, 2) > 0

    import_hf(llama, str(work / "ws"), vision_path=siglip)
    cfg, ws = load_megatron(str(work / "ws"))
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 300, (1, 10), generator=g)
    images = torch.randn(1, 1, 3, IMAGE, IMAGE, generator=g)
    with torch.no_grad():
        ref = LlamaForCausalLM.from_pretrained(llama).eval()(input_ids=tokens).logits
        out["ws_text"] = (ws(ModelInputs(tokens, torch.arange(10)[None]))[..., :300] - ref).abs().max().item()
        sig = SiglipVisionModel.from_pretrained(siglip).eval()(pixel_values=images[:, 0]).last_hidden_state
        out["ws_siglip"] = (ws.vision_model(images[:, 0]) - sig).abs().max().item()
        out["ws_tokens"] = (cfg.model.num_image_tokens, sig.shape[1], cfg.model.language.activation)
    return out


def test_geglu_and_floored_patch_grids_convert_and_verify(tmp_path):
    llava = _save_llava_geglu(tmp_path / "llava")
    llama, siglip = _save_llama_gelu_and_siglip(tmp_path)
    (r,) = run_distributed(_real_configs, 1, str(llava), str(llama), str(siglip), str(tmp_path), timeout=300)
    print(r)
    for side in ("verify", "derived_verify"):
        assert r[side]["max_abs_diff"] <= TOL and r[side]["argmax_agree"] == 1.0, r[side]
    assert r["hidden_act"] == {"back": "gelu_pytorch_tanh", "derived": "gelu_pytorch_tanh"}
    assert r["counts"] == {"config": 49, "hf_image_seq_length": 49, "layout": 49, "model_features": 49,
                           "hf_features": 49, "vision_seq": 50, "activation": "gelu_pytorch_tanh"}
    assert r["features_diff"] <= TOL and r["flops_positive"]
    assert r["ws_text"] <= TOL and r["ws_siglip"] <= TOL and r["ws_tokens"] == (49, 49, "gelu")


def test_gated_activations_map_to_transformers_functions():
    from transformers.activations import ACT2FN

    from megatron_vlm.config import GATED_ACTIVATIONS
    from megatron_vlm.models.vlm import gated_activation

    x = torch.linspace(-6, 6, 1001, dtype=torch.float64)
    for name in GATED_ACTIVATIONS:
        assert (gated_activation(name)(x) - ACT2FN[name](x)).abs().max() < 1e-12, name


def test_unsupported_activation_is_one_line(tmp_path):
    from transformers import LlamaConfig

    from megatron_vlm.conversion.llama import language_config_from_hf
    from megatron_vlm.conversion.mapping import ConversionError
    from megatron_vlm.testing.configs import small_config

    with pytest.raises(ConversionError) as e:
        language_config_from_hf(LlamaConfig(hidden_act="relu"))
    assert str(e.value) == ("text_config.hidden_act='relu': allowed for the gated MLP "
                            "['silu', 'gelu', 'gelu_pytorch_tanh', 'gelu_new']")
    cfg = small_config()
    cfg.model.language.activation = "swish"
    with pytest.raises(ConfigError, match=r"^model.language.activation='swish': allowed \['silu'"):
        validate(cfg)


def test_floored_patch_grid_validates():
    from megatron_vlm.testing.configs import small_config

    cfg = small_config()
    v = cfg.model.vision_encoder
    v.image_size, v.patch_size = 384, 14  # SigLIP-so400m-patch14-384
    cfg.model.language.seq_length = 1024
    validate(cfg)
    assert (v.patches_per_side, v.num_patches, cfg.model.num_image_tokens) == (27, 729, 729)
    v.image_size = 10
    with pytest.raises(ConfigError, match=r"^model.vision.image_size=10: must be at least model.vision.patch_size=14"):
        validate(cfg)


def _cli(argv: list[str]) -> tuple[int, str]:
    from megatron_vlm.conversion.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = main(argv)
    return rc, err.getvalue()


def test_cross_attention_cadence_too_coarse_names_the_smallest_model(tmp_path):
    from megatron_vlm.archs.cross_attention.config import place_text_layers
    from megatron_vlm.testing.configs import small_config

    llama = tiny.save_llama(tmp_path / "llama", layers=2)
    clip = tiny.save_clip_vision(tmp_path / "clip")
    rc, err = _cli(["import-hf", "--hf-path", str(llama), "--vision-path", str(clip), "--arch", "cross_attention",
                    "--cross-attention-every", "4", "--save", str(tmp_path / "out")])
    print(err)
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert "model.cross_attention.every=4" in err and "the smallest text model for every=4 has 3 layers" in err
    assert "allowed for 2 text layer(s): every <= 3" in err and not (tmp_path / "out").exists()
    for every in (1, 2, 3):  # every allowed value works
        mc = small_config().model
        mc.cross_attention.every = every
        assert len(place_text_layers(mc, 2)) == 2
    cfg = small_config()
    cfg.model.arch = "cross_attention"
    with pytest.raises(ConfigError, match=r"allowed: num_layers >= 4 for this cadence, or every <= 2$"):
        validate(cfg)  # every=4 (default) with 2 layers in all
