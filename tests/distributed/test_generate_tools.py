"""tools/generate.py and tools/evaluate.py end to end, and equality with transformers' generate.

* Converted LLaVA and Mllama checkpoints: our greedy answer (KV-cached, prompt tokenized and image
  file preprocessed as generate.py does) equals transformers' ``generate`` on the same token ids and
  pixels, token for token (the tiny HF models' vocabulary = the tokenizer's, so no id is out of
  reach of either side).
* A checkpoint saved at TP=1 (the training contract, data path in its config): generate.py answers
  an image + prompt, answers a JSONL file at TP=1 and at TP=2 (resharded on load) identically;
  evaluate.py reports per question type and writes its JSON.
* Bad input is one line, exit code 2, before any model: missing / unreadable image, prompt longer
  than the context, no tokenizer, PP > 1, bad JSONL, missing split.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from megatron_vlm.testing.distributed import run_distributed

ROOT = Path(__file__).resolve().parents[2]
NEW_TOKENS = 8


def _image(path: Path, seed: int, size=(40, 30)) -> Path:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def _tokenizer(path: Path):
    from megatron_vlm.data.tokenizer import train_bpe

    texts = ["what colour is the circle?", "what shape is red?", "how many shapes?", "a red circle and a blue square."]
    return train_bpe(texts * 4, 300, path)


# ------------------------------------------------------------------------------------------------
# ours vs transformers
# ------------------------------------------------------------------------------------------------

def _single_tile_mllama(path: Path, vocab: int) -> Path:
    import torch
    from transformers import MllamaForConditionalGeneration

    from megatron_vlm.conversion import tiny

    cfg = tiny.mllama_config(vocab=vocab)
    cfg.vision_config.max_num_tiles, cfg.vision_config.supported_aspect_ratios = 1, [[1, 1]]
    torch.manual_seed(0)
    tiny.randomize_(MllamaForConditionalGeneration(cfg), 0).save_pretrained(str(path))
    return path


def _ours_and_hf(work: str) -> dict:
    import torch

    from megatron_vlm.archs import get_arch
    from megatron_vlm.conversion import tiny
    from megatron_vlm.conversion.convert import import_hf
    from megatron_vlm.inference.engine import generate
    from megatron_vlm.inference.loading import load_model, read_checkpoint
    from megatron_vlm.inference.prompts import PromptBuilder, Request

    work = Path(work)
    tok = _tokenizer(work / "tok")
    image = _image(work / "image.png", 0)
    folders = {"llava": tiny.save_llava(work / "llava", vocab=tok.vocab_size + 1),  # + its image token
               "mllama": _single_tile_mllama(work / "mllama", vocab=tok.vocab_size)}
    # our prompts start [bos, <|image|>]: on the bos row (no image) HF's cross-attention attends all
    # image tokens, reproduced by the "hf" mode of that row (single tile: no padded tiles to attend)
    overrides = {"mllama": {"cross_attention.text_rows_without_image": "hf"}}
    out = {}
    for name, hf in folders.items():
        import_hf(str(hf), str(work / f"{name}_ckpt"), model_overrides=overrides.get(name))
        ckpt = read_checkpoint(str(work / f"{name}_ckpt"), str(work / "tok"))
        model = load_model(ckpt)
        family = get_arch(ckpt.cfg.model.arch).family()
        res = {}
        for prompt in ("what colour is the circle?", "how many shapes"):
            (inputs,) = PromptBuilder(ckpt.cfg.model, tok).build_all([Request(prompt, [str(image)])])
            ours = generate(model, [inputs], NEW_TOKENS, vocab_size=ckpt.vocab_size, eos_id=tok.eos_id,
                            banned=ckpt.banned_ids)[0]
            hf_model = family.hf_model_class().from_pretrained(str(hf), local_files_only=True).eval()
            with torch.no_grad():
                theirs = family.hf_generate(hf_model, inputs, NEW_TOKENS)
            res[prompt] = {"ours": ours, "hf": theirs, "prompt_tokens": inputs.tokens[0].tolist()}
        out[name] = res
    return out


def test_greedy_equals_transformers_generate(tmp_path):
    (res,) = run_distributed(_ours_and_hf, 1, str(tmp_path), timeout=600)
    for family, prompts in res.items():
        for prompt, r in prompts.items():
            print(f"{family} {prompt!r}: ours {r['ours']} hf {r['hf']}")
            assert r["ours"] == r["hf"], (family, prompt, r)
            assert len(r["ours"]) == NEW_TOKENS and len(set(r["ours"])) > 1, r  # a real continuation
        a, b = prompts.values()
        assert a["ours"] != b["ours"]  # the prompt matters


# ------------------------------------------------------------------------------------------------
# the tools on a training-style checkpoint
# ------------------------------------------------------------------------------------------------

def _save_checkpoint(data: str, save: str) -> None:
    from megatron_vlm import runtime
    from megatron_vlm.conversion.megatron_io import save_model
    from megatron_vlm.conversion.tiny import randomize_
    from megatron_vlm.data.tokenizer import Tokenizer
    from megatron_vlm.models import build_model
    from megatron_vlm.testing.configs import small_config

    tok = Tokenizer.from_pretrained(Path(data) / "tokenizer")
    cfg = small_config(language_layers=2)
    cfg.model.arch, cfg.model.backend = "joint_decoder", "local"
    cfg.model.language.vocab_size, cfg.model.language.seq_length = 384, 40
    cfg.model.vision_encoder.num_layers, cfg.model.vision_encoder.patch_size = 1, 8  # 16 px: 4 image tokens
    cfg.model.image_token_id = tok.image_token_id
    cfg.data.data_path = data
    runtime.initialize(seed=1)
    runtime.set_seed(0)
    model = build_model(cfg)
    randomize_(model, seed=2)
    save_model(Path(save), model, cfg)


def _tool(name: str, *argv: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(ROOT / "tools" / f"{name}.py"), *argv], capture_output=True,
                          text=True, env=env, timeout=600, cwd=ROOT)


def _cli_cases(cases: list[tuple[str, list[str]]]) -> list[tuple[int, str, str]]:
    """The tools' mains in this (spawned, world of 1) process: (exit code, stdout, stderr) each."""
    from megatron_vlm.quiet import silence_known_warnings

    silence_known_warnings()  # as tools/generate.py and tools/evaluate.py do first
    from megatron_vlm.inference.cli import evaluate_main, generate_main

    out = []
    for tool, argv in cases:
        err, std = io.StringIO(), io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(std):
            rc = (generate_main if tool == "generate" else evaluate_main)(argv)
        out.append((rc, std.getvalue(), err.getvalue()))
    return out


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from megatron_vlm.data import synthetic

    root = tmp_path_factory.mktemp("gen_tools")
    synthetic.prepare(root / "data", num_train=24, num_val=12, image_size=16, vocab_size=300)
    run_distributed(_save_checkpoint, 1, str(root / "data"), str(root / "ckpt"), timeout=300)
    return root


def test_generate_and_evaluate_tools(tiny_run):
    root, ckpt = tiny_run, str(tiny_run / "ckpt")
    rows = root / "rows.jsonl"
    rows.write_text("".join(json.dumps(r) + "\n" for r in [
        {"prompt": "what colour is the circle?", "image": "data/images/val/000000.jpg"},
        {"prompt": "how many shapes?", "images": ["data/images/val/000001.jpg"]},
        {"prompt": "a caption without image and a long prompt"}]))
    common = ["--load", ckpt, "--max-new-tokens", "5"]
    cases = [("generate", common + ["--input", str(rows), "--output", str(root / "out1.jsonl"), "--batch-size", "2"]),
             ("generate", common + ["--image", str(root / "data/images/val/000000.jpg"),
                                    "--prompt", "what colour is the circle?"]),
             ("evaluate", ["--load", ckpt, "--output", str(root / "eval.json"), "--max-new-tokens", "3"])]
    (results,) = run_distributed(_cli_cases, 1, cases, timeout=300)
    assert all(rc == 0 for rc, _, _ in results), results
    # TP=2 from one process (the tool starts its ranks), the TP=1 checkpoint resharded on load
    r = _tool("generate", *common, "--input", str(rows), "--output", str(root / "out2.jsonl"),
              "--tensor-model-parallel-size", "2")
    assert r.returncode == 0, r.stderr[-2000:]
    outs = {tp: [json.loads(line) for line in (root / f"out{tp}.jsonl").read_text().splitlines()] for tp in (1, 2)}
    assert [o["tokens"] for o in outs[1]] == [o["tokens"] for o in outs[2]], outs
    assert len(outs[1]) == 3 and all(1 <= len(o["tokens"]) <= 5 for o in outs[1])
    assert outs[1][0]["prompt"] == "what colour is the circle?" and outs[1][2]["images"] == []
    assert results[1][1].strip() == outs[1][0]["generated"].strip()  # --prompt prints the same answer
    result = json.loads((root / "eval.json").read_text())
    assert result["samples"] == 12 and sorted(result["per_type"]) == ["colour", "count", "shape"]
    assert sum(v["samples"] for v in result["per_type"].values()) == 12
    assert 0 < result["loss"] < 20 and "generative accuracy" in results[2][1]


def test_bad_input_is_one_line(tiny_run):
    root, ckpt = tiny_run, str(tiny_run / "ckpt")
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    no_tok = root / "ckpt_no_tokenizer"
    if not no_tok.exists():
        shutil.copytree(ckpt, no_tok)
        cfg_file = no_tok / "iter_0000000" / "config.yaml"
        cfg = yaml.safe_load(cfg_file.read_text())
        cfg["data"]["data_path"] = cfg["data"]["tokenizer_path"] = None
        cfg_file.write_text(yaml.safe_dump(cfg))
    (root / "bad.jsonl").write_text('{"prompt": "ok"}\nnot json\n')
    image = str(root / "data" / "images" / "val" / "000000.jpg")
    cases = [
        ("generate", ["--load", ckpt, "--image", str(root / "nope.jpg"), "--prompt", "hi"], "nope.jpg"),
        ("generate", ["--load", ckpt, "--image", str(root / "broken.jpg"), "--prompt", "hi"], "broken.jpg"),
        ("generate", ["--load", ckpt, "--image", image, "--prompt", "what colour " * 30], "context of 40"),
        ("generate", ["--load", str(no_tok), "--prompt", "hi"], "--tokenizer-path"),
        ("generate", ["--load", ckpt, "--prompt", "hi", "--pipeline-model-parallel-size", "2"],
         "--pipeline-model-parallel-size 2"),
        ("generate", ["--load", ckpt, "--input", str(root / "bad.jsonl")], "line 2"),
        ("generate", ["--load", str(root / "nothing"), "--prompt", "hi"], "nothing"),
        ("generate", ["--load", ckpt, "--prompt", "hi", "--top-p", "0"], "--top-p 0"),
        ("evaluate", ["--load", ckpt, "--split", "test"], "test"),
    ]
    (results,) = run_distributed(_cli_cases, 1, [(t, a) for t, a, _ in cases], timeout=300)
    for (tool, argv, expect), (rc, _, err) in zip(cases, results):
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert rc == 2 and len(lines) == 1 and expect in lines[0], (argv, rc, err)
        assert lines[0].startswith(f"{tool}.py: error: "), err
