"""Warm start from several HF vision models (``import-hf --vision-path [NAME=]DIR`` repeated).

Tiny HF Llama + CLIP (3 layers, 32 wide) + SigLIP (2 layers, 48 wide, another grid) imported
through the command line, in one spawned process (the conversion initialises torch.distributed):

* joint_decoder, sequence_append, CLIP named after its folder and SigLIP as ``sig=DIR``: each
  encoder's tensors equal the HF ones under ``vision_models.<name>.*`` (SigLIP: every HF tensor
  by its HF name; CLIP: the stem, norms and MLPs by name, and the tower's features equal
  transformers' ``hidden_states[-2]``), the Llama tensors in place, one projector per encoder,
  the first encoder the generalist;
* cross_attention with ``fusion.method=cross_attn`` and ``--generalist sig``: same prefixes, the
  fusion parameters keep the model's init (gate 0);
* one ``--vision-path``: exactly the single-encoder layout (``vision_model.*``, ``vision_projection.*``);
* bad input, one line and exit 2, nothing written: a folder that is not CLIP/SigLIP, two encoders
  of one name, a name that is no identifier, ``--generalist`` naming no encoder (or without
  ``--vision-path``), widths that ``fusion.space=vision`` cannot fuse, export-hf / verify of a
  checkpoint with several encoders.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import torch

from megatron_vlm.conversion import tiny
from megatron_vlm.testing.distributed import run_distributed

TOL = 1e-5
# a SigLIP folder's image statistics other than the usual 0.5 (read, not assumed)
SIGLIP_STATS = {"image_mean": [0.25, 0.5, 0.75], "image_std": [0.125, 0.25, 0.5]}


def _cli(argv: list[str]) -> tuple[int, str]:
    from megatron_vlm.conversion.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = main(argv)
    return rc, err.getvalue()


def _hf_tensors(folder: str) -> dict[str, torch.Tensor]:
    from megatron_vlm.conversion.warm_start import _vision_rename

    return {_vision_rename(k): v for k, v in tiny.load_safetensors_dir(folder).items()}


def _stored_keys(reader) -> set[str]:
    return {k for k in reader.meta if "_extra_state" not in k}


def _prefix(key: str) -> str:
    """``vision_models.clip.conv1.weight`` -> ``vision_models.clip``; ``language_model.x`` -> ``language_model``."""
    parts = key.split(".")
    return ".".join(parts[:2] if parts[0] in ("vision_models", "vision_projections") else parts[:1])


def _worker(llama: str, clip: str, siglip: str, work: str) -> dict:
    from transformers import CLIPVisionModel, SiglipVisionModel

    from megatron_vlm.conversion.megatron_io import MegatronReader
    from megatron_vlm.conversion.verify import load_megatron

    work = Path(work)
    imp = ["import-hf", "--hf-path", llama]
    out = {"jd_rc": _cli(imp + ["--vision-path", clip, "--vision-path", f"sig={siglip}",
                                "--save", str(work / "jd")]),
           "ca_rc": _cli(imp + ["--vision-path", clip, "--vision-path", f"sig={siglip}", "--generalist", "sig",
                                "--arch", "cross_attention", "--set", "model.fusion.method=cross_attn",
                                "--set", "model.cross_attention.every=1", "--save", str(work / "ca")]),
           "one_rc": _cli(imp + ["--vision-path", siglip, "--save", str(work / "one")])}
    hf_clip, hf_sig, hf_llama = _hf_tensors(clip), _hf_tensors(siglip), tiny.load_safetensors_dir(llama)

    def pretrained_diffs(reader, clip_prefix: str | None, sig_prefix: str) -> dict[str, float]:
        """max |ours - HF| over the tensors copied as they are (renamed only)."""
        pairs = [(f"{sig_prefix}hf.{k}", hf_sig[k]) for k in hf_sig if not k.startswith("head.")]
        pairs += [("language_model.decoder.final_layernorm.weight", hf_llama["model.norm.weight"])]
        if clip_prefix is not None:
            pairs += [(f"{clip_prefix}{ours}", hf_clip[theirs]) for ours, theirs in (
                ("conv1.weight", "embeddings.patch_embedding.weight"),
                ("position_embeddings.weight", "embeddings.position_embedding.weight"),
                ("ln_pre.weight", "pre_layrnorm.weight"),
                ("decoder.layers.0.mlp.linear_fc1.weight", "encoder.layers.0.mlp.fc1.weight"),
                ("decoder.layers.1.mlp.linear_fc2.weight", "encoder.layers.1.mlp.fc2.weight"),
                ("decoder.layers.1.pre_mlp_layernorm.bias", "encoder.layers.1.layer_norm2.bias"))]
            pairs += [(f"{clip_prefix}class_token", hf_clip["embeddings.class_embedding"].reshape(1, 1, -1))]
        return {k: (reader.get(k) - v).abs().max().item() for k, v in pairs}

    for name, clip_prefix, sig_prefix in (("jd", "vision_models.clip.", "vision_models.sig."),
                                          ("ca", "vision_models.clip.", "vision_models.sig."),
                                          ("one", None, "vision_model.")):
        reader = MegatronReader(work / name)
        m = reader.config.model
        keys = _stored_keys(reader)
        out[name] = {
            "diffs": pretrained_diffs(reader, clip_prefix, sig_prefix),
            "encoders": [(v.name, v.generalist, v.hf_config is not None) for v in m.vision],
            "stats": [(list(v.image_mean), list(v.image_std)) for v in m.vision],
            "method": m.fusion.method,
            "prefixes": sorted({_prefix(k) for k in keys}),
            "clip_num_layers": m.vision[0].num_layers,
        }
        if "fusion.gate" in keys:
            out[name]["gate"] = reader.get("fusion.gate").abs().max().item()

    # the encoders compute what transformers computes (CLIP: LLaVA's hidden_states[-2], class token kept)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, 28, 28, generator=g)
    with torch.no_grad():
        _, jd = load_megatron(str(work / "jd"))
        clip_ref = CLIPVisionModel.from_pretrained(clip).eval()(pixel_values=images,
                                                                output_hidden_states=True).hidden_states[-2]
        sig_ref = SiglipVisionModel.from_pretrained(siglip).eval()(pixel_values=images).last_hidden_state
        out["clip_features"] = (jd.vision_models["clip"](images) - clip_ref).abs().max().item()
        out["sig_features"] = (jd.vision_models["sig"](images) - sig_ref).abs().max().item()
        out["jd_single_attrs"] = (jd.vision_model is None, jd.vision_projection is None)

    bad_stats = work.parent / "siglip_bad_stats"  # a std of 0 would divide by zero in every batch
    shutil.copytree(siglip, bad_stats)
    (bad_stats / "preprocessor_config.json").write_text(json.dumps({"image_std": [0.5, 0, 0.5]}))
    bad = {
        "bad_stats": imp + ["--vision-path", str(bad_stats)],
        "not_vision": imp + ["--vision-path", clip, "--vision-path", llama],
        "same_name": imp + ["--vision-path", f"a={clip}", "--vision-path", f"a={siglip}"],
        "bad_name": imp + ["--vision-path", f"my-clip={clip}", "--vision-path", siglip],
        "no_generalist": imp + ["--vision-path", clip, "--vision-path", siglip, "--generalist", "dino"],
        "generalist_alone": imp + ["--generalist", "clip"],
        "widths": imp + ["--vision-path", clip, "--vision-path", siglip, "--set", "model.fusion.space=vision"],
    }
    for case, argv in bad.items():
        out[case] = _cli(argv + ["--save", str(work / f"bad_{case}")])
    out["export"] = _cli(["export-hf", "--load", str(work / "jd"), "--hf-path", str(work / "bad_export")])
    out["verify"] = _cli(["verify", "--load", str(work / "jd"), "--hf-path", llama])
    out["left"] = sorted(p.name for p in work.iterdir() if p.name.startswith(("bad_", ".")))
    return out


def test_multi_vision_warm_start(tmp_path):
    from transformers import SiglipVisionConfig, SiglipVisionModel

    llama = tiny.save_llama(tmp_path / "llama")
    clip = tiny.save_clip_vision(tmp_path / "clip", layers=3)
    torch.manual_seed(0)  # another width (48) and grid (4 x 4) than CLIP's (32, 2 x 2)
    tiny.randomize_(SiglipVisionModel(SiglipVisionConfig(
        hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=28,
        patch_size=7)), seed=1).save_pretrained(str(tmp_path / "siglip"))
    (tmp_path / "siglip" / "preprocessor_config.json").write_text(json.dumps(SIGLIP_STATS))
    work = tmp_path / "work"
    work.mkdir()
    (r,) = run_distributed(_worker, 1, str(llama), str(clip), str(tmp_path / "siglip"), str(work), timeout=300)
    print({k: v for k, v in r.items() if k not in ("jd", "ca", "one")})

    for case in ("jd_rc", "ca_rc", "one_rc"):
        assert r[case] == (0, ""), (case, r[case])
    for name in ("jd", "ca", "one"):
        diffs = r[name]["diffs"]
        assert len(diffs) > 10 and max(diffs.values()) == 0.0, (name, {k: v for k, v in diffs.items() if v})
    # names: CLIP's from its folder, SigLIP's given; generalist = the first / --generalist
    assert r["jd"]["encoders"] == [("clip", True, False), ("sig", False, True)]
    assert r["ca"]["encoders"] == [("clip", False, False), ("sig", True, True)]
    assert r["jd"]["method"] == "sequence_append" and r["ca"]["method"] == "cross_attn"
    multi = ["language_model", "vision_models.clip", "vision_models.sig", "vision_projections.clip",
             "vision_projections.sig"]
    assert r["jd"]["prefixes"] == multi
    assert r["ca"]["prefixes"] == ["fusion"] + multi
    assert r["ca"]["gate"] == 0.0  # the fusion keeps the model's init: tanh(0) = generalist only
    assert r["jd"]["clip_num_layers"] == 2  # 3 HF layers, features from the 2nd (LLaVA's -2)
    # one --vision-path: the single-encoder layout and config, as before
    assert r["one"]["prefixes"] == ["language_model", "vision_model", "vision_projection"]
    assert r["one"]["encoders"] == [("vision", False, True)] and r["one"]["method"] == "sequence_append"
    assert r["clip_features"] <= TOL and r["sig_features"] <= TOL, (r["clip_features"], r["sig_features"])
    assert r["jd_single_attrs"] == (True, True)
    # image statistics from each folder's preprocessor_config.json (CLIP's tiny folder has none: CLIP's)
    sig = (SIGLIP_STATS["image_mean"], SIGLIP_STATS["image_std"])
    assert r["jd"]["stats"][1] == sig and r["one"]["stats"] == [sig], (r["jd"]["stats"], r["one"]["stats"])

    expect = {
        "bad_stats": "image_std=[0.5, 0, 0.5]: expected 3 finite numbers (one per RGB channel), each > 0",
        "not_vision": "--vision-path " + str(llama) + ": model_type 'llama'; supported: clip_vision_model",
        "same_name": "two encoders named 'a'",
        "bad_name": "encoder name 'my-clip' must be a Python identifier",
        "no_generalist": "--generalist dino: no encoder of that name; encoders: ['clip', 'siglip']",
        "generalist_alone": "--generalist clip: only for a warm start (with --vision-path)",
        "widths": "clip (32), siglip (48)",  # config validation: widths space=vision cannot fuse
        "export": "export-hf takes a checkpoint with one vision encoder",
        "verify": "verify takes a checkpoint with one vision encoder",
    }
    for case, text in expect.items():
        rc, err = r[case]
        assert rc == 2 and text in err and err.count("\n") == 1, (case, rc, err)
    assert "['clip', 'sig']" in r["export"][1] and "['clip', 'sig']" in r["verify"][1]
    assert r["left"] == [], r["left"]  # no --save / --hf-path folder, no temp folder


def test_vision_path_names(tmp_path):
    """Names from ``--vision-path [NAME=]DIR``: given ones kept, others from the folder made an
    identifier and de-duplicated against every other name; bad names one line each."""
    import pytest

    from megatron_vlm.conversion.mapping import ConversionError
    from megatron_vlm.conversion.warm_start import encoder_names, parse_vision_paths

    odd = tmp_path / "odd=dir"  # an existing folder with '=' in its name is a folder
    odd.mkdir()
    items = ["/m/clip-vit-large-patch14/", "/n/CLIP.vit.large.patch14", "clip_vit_large_patch14_2=/o/x",
             "/m/2x", "/m/train", "sig=/p/so400m", str(odd), "/a=b/c"]
    sources = parse_vision_paths(items)
    assert [n for n, _ in sources] == [None, None, "clip_vit_large_patch14_2", None, None, "sig", None, None]
    assert sources[6][1] == str(odd) and sources[7][1] == "/a=b/c"
    assert encoder_names(sources) == ["clip_vit_large_patch14", "clip_vit_large_patch14_3",
                                      "clip_vit_large_patch14_2", "v2x", "train_enc", "sig", "odd_dir", "c"]
    for bad, text in ((["a=/x", "a=/y"], "two encoders named 'a' (/x, /y)"),
                      (["1a=/x"], "encoder name '1a' must be a Python identifier"),
                      (["keys=/x"], "encoder name 'keys' is reserved"),
                      (["a="], "no folder after 'a='")):
        with pytest.raises(ConversionError) as e:
            encoder_names(parse_vision_paths(bad))
        assert text in str(e.value) and "\n" not in str(e.value), str(e.value)
