"""HF <-> Megatron conversion, single rank (each case runs in a fresh spawned process: the
conversion initialises torch.distributed and megatron's parallel state).

* LLaVA and Mllama: HF -> Megatron -> HF is bit-identical for every tensor (and dtype); verify
  (our model vs transformers) <= 1e-4 in fp32; the exported folder loads with from_pretrained and
  greedy-generates the same tokens as our model; export with --dtype bfloat16.
* Failures: one clear line (exit 2), missing / unexpected keys listed, no output folder left.
* Warm start (Llama + CLIP / SigLIP -> joint_decoder / cross_attention): pretrained parts exact,
  cross_attention is the Llama text model at step 0 (gates 0).
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from megatron_vlm.conversion import tiny
from megatron_vlm.testing.distributed import run_distributed

TOL = 1e-4


# ------------------------------------------------------------------------------------------------
# workers (module level: spawned processes import them)
# ------------------------------------------------------------------------------------------------

def _round_trip_and_verify(hf: str, work: str, tokenizer: str) -> dict:
    from megatron_vlm.conversion.convert import export_hf, import_hf
    from megatron_vlm.conversion.verify import verify

    work = Path(work)
    import_hf(hf, str(work / "mcore"))
    export_hf(str(work / "mcore"), str(work / "back"), max_shard_bytes=150_000)
    export_hf(str(work / "mcore"), str(work / "back_bf16"), dtype=torch.bfloat16, tokenizer_path=tokenizer)
    original = verify(hf, str(work / "mcore"), seed=1)
    exported = verify(str(work / "back"), str(work / "mcore"), seed=1, generate=6)
    # a checkpoint without what the import carried (e.g. one written by training): derived config
    shutil.copytree(work / "mcore", work / "bare")
    shutil.rmtree(work / "bare" / "iter_0000000" / "hf_source")
    export_hf(str(work / "bare"), str(work / "derived"))
    derived = verify(str(work / "derived"), str(work / "bare"), seed=1, generate=6)
    return {"original": original.__dict__, "exported": exported.__dict__, "derived": derived.__dict__,
            "rope": _rope_frequencies(hf, str(work / "mcore"))}


def _rope_frequencies(hf: str, mcore: str) -> tuple[list, list]:
    """RoPE inverse frequencies of our imported model and of transformers for the HF text config."""
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from megatron_vlm.conversion.verify import load_megatron

    _, model = load_megatron(mcore)
    tc = AutoConfig.from_pretrained(hf).text_config
    rope_type = tc.rope_parameters["rope_type"]
    theirs = (ROPE_INIT_FUNCTIONS[rope_type](tc, "cpu")[0] if rope_type != "default"
              else 1.0 / tc.rope_parameters["rope_theta"] ** (torch.arange(0, tc.head_dim, 2).float() / tc.head_dim))
    return model.language_model.rotary_pos_emb.inv_freq.tolist(), theirs.tolist()


def _cli_cases(cases: list[tuple[str, list[str]]]) -> list[tuple[int, str]]:
    from megatron_vlm.conversion.cli import main

    out = []
    for _, argv in cases:
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            rc = main(argv)
        out.append((rc, err.getvalue()))
    return out


def _warm_start(llama: str, clip: str, siglip: str, work: str) -> dict:
    from transformers import CLIPVisionModel, LlamaForCausalLM, SiglipVisionModel

    from megatron_vlm.conversion.convert import import_hf
    from megatron_vlm.conversion.verify import load_megatron
    from megatron_vlm.data.batch import ModelInputs

    work = Path(work)
    import_hf(llama, str(work / "jd"), vision_path=clip)
    import_hf(llama, str(work / "ca"), vision_path=siglip, arch="cross_attention",
              model_overrides={"cross_attention.every": 1})
    import_hf(llama, str(work / "mot"), vision_path=clip, arch="mot")
    import_hf(llama, str(work / "moma"), vision_path=clip, arch="moma",
              model_overrides={"moma.experts": {"image": 2, "text": 2}})
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 300, (1, 10), generator=g)
    pos = torch.arange(10)[None]
    images = torch.randn(1, 1, 3, 28, 28, generator=g)
    hf_llama = LlamaForCausalLM.from_pretrained(llama).eval()
    out = {}
    with torch.no_grad():
        ref = hf_llama(input_ids=tokens).logits
        cfg, jd = load_megatron(str(work / "jd"))
        out["jd_text"] = (jd(ModelInputs(tokens, pos))[..., :300] - ref).abs().max().item()
        clip_ref = CLIPVisionModel.from_pretrained(clip).eval()(
            pixel_values=images[:, 0], output_hidden_states=True).hidden_states[-2][:, 1:]
        ours = jd.vision_model(images[:, 0])[:, 1:]
        out["clip_features"] = (ours - clip_ref).abs().max().item()
        out["jd_layers"] = (cfg.model.vision_encoder.num_layers, cfg.model.language.num_layers)
        cfg, ca = load_megatron(str(work / "ca"))
        out["ca_text"] = (ca(ModelInputs(tokens, pos))[..., :300] - ref).abs().max().item()
        out["ca_images"] = (ca(ModelInputs(tokens, pos, images=images))[..., :300] - ref).abs().max().item()
        out["ca_layers"] = (cfg.model.language.num_layers, len(ca.cross_attention_layers()))
        siglip_ref = SiglipVisionModel.from_pretrained(siglip).eval()(pixel_values=images[:, 0]).last_hidden_state
        out["siglip_features"] = (ca.vision_model(images[:, 0]) - siglip_ref).abs().max().item()
        _, mot = load_megatron(str(work / "mot"))  # every modality's copy = Llama: the Llama model on text
        out["mot_text"] = (mot(ModelInputs(tokens, pos))[..., :300] - ref).abs().max().item()
        _, moma = load_megatron(str(work / "moma"))  # every expert = the Llama MLP
        dense = jd.state_dict()
        diffs = [(v - dense[re.sub(r"experts\.local_experts\.\d+\.", "", k)]).abs().max().item()
                 for k, v in moma.state_dict().items() if ".experts.local_experts." in k and k.endswith(".weight")]
        out["moma_experts"] = (len(diffs), max(diffs))
    return out


# ------------------------------------------------------------------------------------------------
# fixtures
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {"llava": tiny.save_llava(root / "llava"), "mllama": tiny.save_mllama(root / "mllama")}


def _assert_bit_identical(a: Path, b: Path) -> int:
    ta, tb = tiny.load_safetensors_dir(a), tiny.load_safetensors_dir(b)
    assert set(ta) == set(tb), set(ta) ^ set(tb)
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]), k
    return len(ta)


# ------------------------------------------------------------------------------------------------
# tests
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["llava", "mllama"])
def test_round_trip_verify_and_generate(family, hf_models, tmp_path):
    hf = hf_models[family]
    tok = tmp_path / "tok"
    tok.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (tok / name).write_text("{}")
    (tok / "model.safetensors").write_text("not a tokenizer file")
    (res,) = run_distributed(_round_trip_and_verify, 1, str(hf), str(tmp_path), str(tok), timeout=300)
    n = _assert_bit_identical(hf, tmp_path / "back")
    assert n > 50
    assert len(list((tmp_path / "back").glob("model-*.safetensors"))) > 1  # sharded + index
    assert json.loads((tmp_path / "back" / "config.json").read_text())["architectures"] == \
        json.loads((hf / "config.json").read_text())["architectures"]
    assert sorted(p.name for p in (tmp_path / "back_bf16").glob("*.json") if "token" in p.name) == \
        ["special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]
    half = tiny.load_safetensors_dir(tmp_path / "back_bf16")
    for k, t in tiny.load_safetensors_dir(hf).items():
        assert half[k].dtype == torch.bfloat16 and torch.equal(half[k], t.to(torch.bfloat16)), k
    for side in ("original", "exported", "derived"):
        r = res[side]
        print(f"{family} {side}: max abs diff {r['max_abs_diff']:.2e} over {r['shape']}; "
              f"generated {r['generated_megatron']}")
        assert r["max_abs_diff"] <= TOL and r["argmax_agree"] == 1.0
    for side in ("exported", "derived"):
        gen = res[side]
        assert len(gen["generated_hf"]) == 6 and gen["generated_megatron"] == gen["generated_hf"], gen
    ours, theirs = res["rope"]  # Mllama's tiny config uses Llama-3 RoPE scaling, LLaVA plain RoPE
    assert torch.allclose(torch.tensor(ours), torch.tensor(theirs), rtol=1e-6, atol=0), (ours, theirs)
    assert len(set(res["exported"]["generated_hf"])) > 1  # a non-degenerate continuation


def _as_bin_folder(src: Path, dst: Path, shards: int) -> None:
    """``src`` (safetensors) as transformers saved folders before safetensors: ``torch.save``d dicts,
    ``pytorch_model.bin`` or ``pytorch_model-0000k-of-0000n.bin`` + ``pytorch_model.bin.index.json``.
    One matrix is stored transposed-contiguous (a strided view), as tied or transposed weights can be."""
    tensors = tiny.load_safetensors_dir(src)
    dst.mkdir()
    for f in src.iterdir():
        if f.is_file() and not f.name.startswith("model.safetensors") and f.suffix != ".safetensors":
            shutil.copy2(f, dst / f.name)
    keys = sorted(tensors)
    strided = next(k for k in keys if tensors[k].dim() == 2 and tensors[k].shape[0] != tensors[k].shape[1])
    tensors[strided] = tensors[strided].t().contiguous().t()
    if shards == 1:
        torch.save(tensors, dst / "pytorch_model.bin")
        return
    weight_map = {}
    for i in range(shards):
        name = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = {k: tensors[k] for k in keys[i::shards]}
        torch.save(part, dst / name)
        weight_map.update({k: name for k in part})
    (dst / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def test_bin_folders_import_like_safetensors(hf_models, tmp_path):
    """A LLaVA folder of ``.bin`` files (sharded with an index, or one file) imports to the same
    checkpoint as its safetensors twin: exported back it equals the safetensors folder bit for bit.
    A ``.bin`` that is not a torch state dict is one line."""
    llava = hf_models["llava"]
    _as_bin_folder(llava, tmp_path / "sharded", shards=3)
    _as_bin_folder(llava, tmp_path / "single", shards=1)
    (tmp_path / "broken").mkdir()
    shutil.copy2(llava / "config.json", tmp_path / "broken" / "config.json")
    (tmp_path / "broken" / "pytorch_model.bin").write_bytes(b"not a zip archive")
    cases = []
    for name in ("sharded", "single"):
        cases += [(f"import {name}", ["import-hf", "--hf-path", str(tmp_path / name), "--save", str(tmp_path / f"mc_{name}")]),
                  (f"export {name}", ["export-hf", "--load", str(tmp_path / f"mc_{name}"), "--hf-path",
                                      str(tmp_path / f"back_{name}")])]
    cases.append(("broken", ["import-hf", "--hf-path", str(tmp_path / "broken"), "--save", str(tmp_path / "mc_broken")]))
    (results,) = run_distributed(_cli_cases, 1, cases, timeout=300)
    for (case, _), (rc, err) in zip(cases[:-1], results[:-1]):
        assert rc == 0, (case, err)
    for name in ("sharded", "single"):
        assert _assert_bit_identical(llava, tmp_path / f"back_{name}") > 20
    rc, err = results[-1]
    assert rc == 2 and "cannot read pytorch_model.bin as a torch state dict" in err and err.count("\n") == 1, err
    assert not (tmp_path / "mc_broken").exists()


def _rewrite_without(src: Path, dst: Path, drop: str | None = None, add: dict | None = None) -> None:
    """Copy an HF folder as a single safetensors file, minus / plus some tensors."""
    from safetensors.torch import save_file

    dst.mkdir()
    tensors = tiny.load_safetensors_dir(src)
    if drop:
        tensors.pop(drop)
    tensors.update(add or {})
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(src / "config.json", dst / "config.json")


def test_failures_are_clean(hf_models, tmp_path):
    llava = hf_models["llava"]
    bad_arch = tmp_path / "qwen"
    bad_arch.mkdir()
    (bad_arch / "config.json").write_text(json.dumps({"architectures": ["Qwen2VLForConditionalGeneration"],
                                                      "model_type": "qwen2_vl"}))
    relu = tmp_path / "relu"
    shutil.copytree(llava, relu)
    cfg = json.loads((relu / "config.json").read_text())
    cfg["projector_hidden_act"] = "relu"
    (relu / "config.json").write_text(json.dumps(cfg))
    missing, extra = tmp_path / "missing", tmp_path / "extra"
    _rewrite_without(llava, missing, drop="language_model.model.layers.1.mlp.up_proj.weight")
    _rewrite_without(llava, extra, add={"language_model.model.layers.9.mlp.up_proj.weight": torch.zeros(2)})
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("mine")
    other = tiny.save_llava(tmp_path / "other", seed=7)
    # hostile weight files: an index that is not JSON, one naming a file outside the folder, a
    # safetensors file cut short (its header describes more bytes than it holds)
    bad_json, escaping, cut = tmp_path / "bad_json", tmp_path / "escaping", tmp_path / "cut"
    for folder in (bad_json, escaping):
        shutil.copytree(llava, folder)
    (bad_json / "model.safetensors.index.json").write_text("{not json")
    index = json.loads((escaping / "model.safetensors.index.json").read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = "../other/" + index["weight_map"][first]
    (escaping / "model.safetensors.index.json").write_text(json.dumps(index))
    _rewrite_without(llava, cut)
    raw = (cut / "model.safetensors").read_bytes()
    (cut / "model.safetensors").write_bytes(raw[:len(raw) // 2])
    out = tmp_path / "out"
    cases = [
        ("bad index", ["import-hf", "--hf-path", str(bad_json), "--save", str(out)]),
        ("escaping index", ["import-hf", "--hf-path", str(escaping), "--save", str(out)]),
        ("cut", ["import-hf", "--hf-path", str(cut), "--save", str(out)]),
        ("arch", ["import-hf", "--hf-path", str(bad_arch), "--save", str(out)]),
        ("config", ["import-hf", "--hf-path", str(relu), "--save", str(out)]),
        ("missing", ["import-hf", "--hf-path", str(missing), "--save", str(out)]),
        ("unexpected", ["import-hf", "--hf-path", str(extra), "--save", str(out)]),
        ("tp", ["import-hf", "--hf-path", str(llava), "--save", str(out), "--tensor-model-parallel-size", "3"]),
        ("ep", ["import-hf", "--hf-path", str(llava), "--save", str(out), "--expert-model-parallel-size", "2"]),
        ("wrong arch", ["import-hf", "--hf-path", str(llava), "--save", str(out), "--arch", "cross_attention"]),
        ("occupied", ["import-hf", "--hf-path", str(llava), "--save", str(occupied)]),
        ("not a ckpt", ["export-hf", "--load", str(tmp_path), "--hf-path", str(out)]),
        ("ok", ["import-hf", "--hf-path", str(llava), "--save", str(tmp_path / "mc")]),
        ("verify other", ["verify", "--hf-path", str(other), "--load", str(tmp_path / "mc")]),
    ]
    (results,) = run_distributed(_cli_cases, 1, cases, timeout=300)
    got = {name: r for (name, _), r in zip(cases, results)}
    for name, (rc, err) in got.items():
        print(f"{name}: rc={rc} {err.strip()!r}")
    for name in ("arch", "config", "tp", "ep", "wrong arch", "occupied", "not a ckpt", "bad index",
                 "escaping index", "cut"):
        rc, err = got[name]
        assert rc == 2 and len(err.strip().splitlines()) == 1 and err.startswith("convert_checkpoint.py: error: "), name
    assert "unsupported HF architecture" in got["arch"][1]
    assert "projector_hidden_act='relu'" in got["config"][1]
    assert "num_attention_heads=4: must be divisible by parallel.tensor_model_parallel_size=3" in got["tp"][1]
    assert "not empty" in got["occupied"][1]
    assert "model.safetensors.index.json is not a weight index (JSONDecodeError" in got["bad index"][1]
    assert "a weight_map value must be the name of a file in this folder" in got["escaping index"][1]
    assert "model.safetensors is truncated" in got["cut"][1]
    assert got["missing"][0] == 2 and "1 missing key(s)" in got["missing"][1] and \
        "missing: language_model.model.layers.1.mlp.up_proj.weight" in got["missing"][1]
    assert got["unexpected"][0] == 2 and "unexpected: language_model.model.layers.9.mlp.up_proj.weight" in got["unexpected"][1]
    assert not out.exists(), "a failed conversion left an output folder"
    assert [p.name for p in occupied.iterdir()] == ["keep.txt"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temp folder left behind"
    assert got["ok"][0] == 0 and (tmp_path / "mc" / "latest").read_text() == "0"
    assert got["verify other"][0] == 1  # logits of another model: above tolerance -> exit 1


def test_warm_start(tmp_path):
    from transformers import SiglipVisionConfig, SiglipVisionModel

    llama = tiny.save_llama(tmp_path / "llama")
    clip = tiny.save_clip_vision(tmp_path / "clip", layers=3)
    torch.manual_seed(0)
    tiny.randomize_(SiglipVisionModel(SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=28,
        patch_size=14))).save_pretrained(str(tmp_path / "siglip"))
    (r,) = run_distributed(_warm_start, 1, str(llama), str(clip), str(tmp_path / "siglip"), str(tmp_path),
                           timeout=300)
    print(r)
    assert r["jd_layers"] == (2, 2)  # CLIP: 3 layers, features from the 2nd (LLaVA's -2)
    assert r["ca_layers"] == (4, 2)  # 2 Llama layers + 2 cross-attention layers (every=1)
    for key in ("jd_text", "clip_features", "ca_text", "ca_images", "siglip_features", "mot_text"):
        assert r[key] <= TOL, (key, r[key])
    assert r["moma_experts"] == (2 * 4 * 2, 0.0)  # 2 layers x 4 experts x (fc1, fc2), exact copies
