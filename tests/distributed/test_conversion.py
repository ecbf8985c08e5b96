"""Conversion across layouts on gloo ranks.

* import-hf with --tensor-model-parallel-size 2 (written once, layout recorded), verify on 2 ranks
  at TP=2 for LLaVA and Mllama (<= 1e-4) with greedy generation;
* the imported checkpoint loads in pretrain_vlm's training loop at TP=2 (model-only checkpoint:
  fresh optimizer) and at PP=2, trains, saves; export-hf reads those TP=2 / PP=2 checkpoints (with
  optimizer state) and the exported folder matches the trained model (verify at TP=1).
"""

from __future__ import annotations

from pathlib import Path

from megatron_vlm.conversion import tiny
from megatron_vlm.testing.distributed import run_distributed

TOL = 1e-4


def _import(pairs: list[tuple[str, str]], tp: int) -> None:
    from megatron_vlm.conversion.convert import import_hf

    for hf, save in pairs:
        import_hf(hf, save, tp=tp)


def _verify(pairs: list[tuple[str, str]], tp: int) -> list:
    from megatron_vlm.conversion.verify import verify

    out = []
    for hf, load in pairs:
        r = verify(hf, load, tp=tp, seed=1, generate=4)
        out.append(None if r is None else r.__dict__)
    return out


def _train(argv: list[str]) -> int:
    from megatron_vlm.training.cli import run

    return run(argv)


def _export_and_verify(load: str, out: str) -> dict:
    from megatron_vlm.conversion.convert import export_hf
    from megatron_vlm.conversion.verify import verify

    export_hf(load, out)
    return verify(out, load, seed=1, generate=4).__dict__


def test_tp2_import_verify_train_export(tmp_path):
    llava = tiny.save_llava(tmp_path / "llava")
    mllama = tiny.save_mllama(tmp_path / "mllama")
    pairs = [(str(llava), str(tmp_path / "llava_tp2")), (str(mllama), str(tmp_path / "mllama_tp2"))]
    run_distributed(_import, 1, pairs, 2, timeout=300)
    assert "tensor_model_parallel_size: 2" in (tmp_path / "llava_tp2" / "iter_0000000" / "config.yaml").read_text()

    results = run_distributed(_verify, 2, pairs, 2, timeout=300)
    for (hf, _), r in zip(pairs, results[0]):
        print(f"{Path(hf).name} TP=2: max abs diff {r['max_abs_diff']:.2e}, generated {r['generated_megatron']}")
        assert r["max_abs_diff"] <= TOL and r["argmax_agree"] == 1.0
        assert r["generated_megatron"] == r["generated_hf"] and len(r["generated_hf"]) == 4

    ckpt = tmp_path / "llava_tp2"
    common = ["--config", str(ckpt / "iter_0000000" / "config.yaml"), "--load", str(ckpt),
              "--data-path", "mock", "--train-iters", "1", "--micro-batch-size", "1",
              "--global-batch-size", "2", "--lr", "1e-2"]
    trained = {"tp2": tmp_path / "trained_tp2", "pp2": tmp_path / "trained_pp2"}
    assert run_distributed(_train, 2, common + ["--save", str(trained["tp2"])], timeout=300) == [0, 0]
    assert run_distributed(_train, 2, common + ["--save", str(trained["pp2"]), "--tensor-model-parallel-size", "1",
                                                "--pipeline-model-parallel-size", "2"], timeout=300) == [0, 0]
    for name, path in trained.items():
        assert (path / "latest").read_text() == "1"
        (r,) = run_distributed(_export_and_verify, 1, str(path), str(tmp_path / f"hf_{name}"), timeout=300)
        print(f"trained {name} -> HF: max abs diff {r['max_abs_diff']:.2e}")
        assert r["max_abs_diff"] <= TOL and r["generated_megatron"] == r["generated_hf"]
    # training moved the weights away from the import
    before = tiny.load_safetensors_dir(llava)["language_model.model.layers.0.mlp.up_proj.weight"]
    after = tiny.load_safetensors_dir(tmp_path / "hf_tp2")["language_model.model.layers.0.mlp.up_proj.weight"]
    assert not (before == after).all()
