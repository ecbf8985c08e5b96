"""Conversion on a CUDA node (skipped without one), through the tools as a user runs them there:
``import-hf`` of a tiny LLaVA and a tiny tiled Mllama, ``verify`` (our model and transformers' on the
GPU, fp32, greedy generation with the KV cache), ``pretrain_vlm.py --finetune`` from the import in
bf16 (mock data), and ``export-hf`` of the trained checkpoint verified again."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_vlm.conversion import tiny

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

ROOT = Path(__file__).resolve().parents[2]
TOL = 1e-4  # as on CPU: fp32 on both sides (TF32 is off in our runtime and transformers' default)


def _run(*argv: str) -> str:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{argv[:2]} exit {proc.returncode}:\n{out[-4000:]}"
    return out


def _verify(hf: Path, load: Path) -> float:
    out = _run("tools/convert_checkpoint.py", "verify", "--hf-path", str(hf), "--load", str(load), "--generate", "4")
    diffs = [float(x) for x in re.findall(r"max abs diff ([0-9.e+-]+)", out)]
    assert diffs and "generations differ" not in out, out[-3000:]
    print(f"verify {hf.name} on {torch.cuda.get_device_name()}: max abs diff {diffs[-1]:.2e}")
    return diffs[-1]


def test_import_verify_finetune_export_on_gpu(tmp_path):
    llava, mllama = tiny.save_llava(tmp_path / "llava"), tiny.save_mllama(tmp_path / "mllama", image_size=28)
    _run("tools/convert_checkpoint.py", "import-hf", "--hf-path", str(llava), "--save", str(tmp_path / "llava_mc"))
    _run("tools/convert_checkpoint.py", "import-hf", "--hf-path", str(mllama), "--save", str(tmp_path / "mllama_mc"),
         "--set", "model.vision.max_tiles=4")
    assert _verify(llava, tmp_path / "llava_mc") <= TOL
    assert _verify(mllama, tmp_path / "mllama_mc") <= TOL  # a 3 x 1 tile image (sample_inputs)

    ckpt = tmp_path / "llava_mc"
    _run("pretrain_vlm.py", "--config", str(ckpt / "iter_0000000" / "config.yaml"), "--load", str(ckpt),
         "--finetune", "--data-path", "mock", "--train-iters", "3", "--micro-batch-size", "2",
         "--global-batch-size", "2", "--lr", "1e-2", "--bf16", "--save", str(tmp_path / "trained"),
         "--log-dir", str(tmp_path / "log"))
    assert (tmp_path / "trained" / "latest").read_text().strip() == "3"
    _run("tools/convert_checkpoint.py", "export-hf", "--load", str(tmp_path / "trained"), "--hf-path",
         str(tmp_path / "back"), "--dtype", "float32")
    before = tiny.load_safetensors_dir(llava)["language_model.model.layers.0.mlp.up_proj.weight"]
    after = tiny.load_safetensors_dir(tmp_path / "back")["language_model.model.layers.0.mlp.up_proj.weight"]
    assert not torch.equal(before, after)  # training moved the weights
    # the trained checkpoint holds bf16 weights: our model and the fp32 export agree to bf16 rounding
    out = _run("tools/convert_checkpoint.py", "verify", "--hf-path", str(tmp_path / "back"), "--load",
               str(tmp_path / "trained"), "--tolerance", "1e-2")
    assert "max abs diff" in out


def test_import_holds_no_model_on_the_gpu(tmp_path):
    """import-hf on a GPU node builds on the host (filled and written one parameter at a time): the
    GPU never holds the model (megatron would otherwise allocate every parallel linear there)."""
    llava = tiny.save_llava(tmp_path / "llava", text_layers=4, hidden=128, ffn=512)
    nbytes = sum(p.stat().st_size for p in llava.glob("*.safetensors"))
    script = ("import sys, torch\n"
              "from megatron_vlm.conversion.convert import import_hf\n"
              "import_hf(sys.argv[1], sys.argv[2])\n"
              "print('PEAK', torch.cuda.max_memory_allocated())")
    out = _run("-c", script, str(llava), str(tmp_path / "mc"))
    peak = int(re.findall(r"PEAK (\d+)", out)[-1])
    print(f"import-hf: peak GPU memory {peak} bytes for a {nbytes}-byte checkpoint")
    assert peak < 0.25 * nbytes
