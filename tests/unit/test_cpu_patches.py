"""Every patch of the CPU compatibility layer (``megatron_vlm.runtime.cpu.PATCHES``) is needed.

For each patch, the megatron-core code it covers is run twice on a 2-rank gloo world (TP=1,
EP=2, DP=2): once with the whole layer (it must work, and give the right numbers) and once with
``cpu.apply(skip=(name,))`` (it must fail with that patch's specific error, raised from the
megatron-core function the patch names).

Patches are process-global, so every case needs a process in which no patch was applied yet. To
keep this file fast, one driver process (``python -m tests.unit.test_cpu_patches OUT.json``)
imports torch and megatron-core once, then ``fork``s a fresh pair of ranks per case (and one
process for the idempotence check); the driver itself never applies a patch. The refusals
(unknown names, CUDA present, other megatron-core version) raise before patching anything and run
in the pytest process. The ranks also apply ``runtime.megatron_fixes`` as ``runtime.initialize``
does; its torch-Adam checkpoint fix is tested in test_megatron_fixes.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
WORLD = 2
CASE_TIMEOUT_S = 120
SEED = 1234
RNG_SEED = 321

NO_CUDA = "Torch not compiled with CUDA enabled"
# patch name -> (probe that exercises it, {sub-check that fails without the patch: (exception
# type, text in its message, megatron-core frame "path/file.py:function" it is raised in)}).
# Exactly these sub-checks of the probe fail without the patch; all of them pass with it.
EXPECTED_FAILURES = {
    "current_device": ("gpt", {
        "forward": ("AssertionError", NO_CUDA, "models/common/embeddings/rotary_pos_embedding.py:get_emb")}),
    "device_args": ("gpt", {
        "forward": ("AssertionError", NO_CUDA, "transformer/utils.py:get_default_causal_mask"),
        "schedule": ("AssertionError", NO_CUDA, "pipeline_parallel/schedules.py:forward_backward_no_pipelining")}),
    "rng": ("rng", {
        "seed": ("AssertionError", NO_CUDA, "tensor_parallel/random.py:add")}),
    "streams": ("moe", {
        "build": ("RuntimeError", "torch.cuda.Stream requires CUDA support",
                  "transformer/moe/token_dispatcher.py:__init__")}),
    "moe_split_sizes": ("moe", {
        "forward": ("TypeError", "all_to_all_single(): incompatible function arguments",
                    "tensor_parallel/mappings.py:all_to_all")}),
    "te_general_gemm": ("moe", {
        "forward": ("NameError", "name 'te_general_gemm' is not defined", "transformer/moe/moe_utils.py:forward")}),
    "tensor_type_strings": ("optimizer", {
        "build": ("TypeError", "Wrapped parameters must be one of torch.cuda.FloatTensor",
                  "optimizer/distrib_optimizer.py:_build_model_and_main_param_groups")}),
    "uneven_all_gather": ("gather", {
        "forward": ("RuntimeError", "ProcessGroupGloo::allgather: invalid tensor size",
                    "tensor_parallel/mappings.py:_gather_along_first_dim")}),
}
PROBE_NAMES = ("rng", "gpt", "moe", "optimizer", "gather")


# ================================================================================================
# Child side (runs in the forked ranks; never in the pytest process)
# ================================================================================================

class _Stop(Exception):
    pass


class Recorder:
    """Records each named sub-check as ok or as (exception type, message, megatron frames)."""

    def __init__(self):
        self.checks: dict[str, dict] = {}
        self.data: dict[str, object] = {}

    @contextlib.contextmanager
    def check(self, name: str, fatal: bool = True):
        try:
            yield
        except _Stop:
            raise
        except Exception as e:  # noqa: BLE001 - recorded and asserted by the parent
            frames = [f"{Path(f.filename).as_posix().split('megatron/core/', 1)[1]}:{f.name}"
                      for f in traceback.extract_tb(e.__traceback__)
                      if "megatron/core/" in Path(f.filename).as_posix()]
            self.checks[name] = {"ok": False, "type": type(e).__name__,
                                 "message": str(e).replace("\n", " ")[:400], "frames": frames}
            if fatal:
                raise _Stop() from None
        else:
            self.checks[name] = {"ok": True}

    def result(self) -> dict:
        return {"checks": self.checks, "data": self.data}


def _tiny_gpt_config(**kw):
    import torch
    from megatron.core.transformer.transformer_config import TransformerConfig

    base = dict(num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64,
                use_cpu_initialization=True, hidden_dropout=0.0, attention_dropout=0.0,
                bias_activation_fusion=False, bias_dropout_fusion=False, masked_softmax_fusion=False,
                apply_rope_fusion=False, gradient_accumulation_fusion=False,
                params_dtype=torch.float32, pipeline_dtype=torch.float32)
    base.update(kw)
    return TransformerConfig(**base)


def _gpt_batch(vocab=64, b=2, s=16):
    import torch

    g = torch.Generator().manual_seed(5)  # same data on every rank
    tokens = torch.randint(0, vocab, (b, s), generator=g)
    return {"input_ids": tokens, "position_ids": torch.arange(s).expand(b, s).clone(),
            "attention_mask": None, "labels": torch.roll(tokens, -1, 1)}


def _build_gpt(config):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    return GPTModel(config=config, transformer_layer_spec=get_gpt_layer_local_spec(), vocab_size=64,
                    max_sequence_length=16, position_embedding_type="rope")


def _forward_step(batch_iter, model):
    batch = next(batch_iter)
    out = model(**batch)

    def loss_func(output):
        loss = output.float().mean()
        return loss, {"lm loss": loss.detach().clone()}

    return out, loss_func


def probe_rng(rec: Recorder) -> None:
    """``model_parallel_cuda_manual_seed`` + ``CudaRNGStatesTracker.fork``: the TP stream must be
    seeded with seed + 2718 + tp_rank (each rank plays TP rank = its rank: distinct streams),
    continue across forks, and leave the default (data-parallel) stream alone."""
    import torch
    from megatron.core import tensor_parallel

    with rec.check("seed"):
        tensor_parallel.model_parallel_cuda_manual_seed(RNG_SEED, tp_rank=torch.distributed.get_rank())
    with rec.check("fork"):
        tracker = tensor_parallel.get_cuda_rng_tracker()
        with tracker.fork():
            first = torch.rand(4)
        outside = torch.rand(4)
        with tracker.fork():
            second = torch.rand(4)
        rec.data.update(fork=first.tolist() + second.tolist(), outside=outside.tolist())


def _embedding_forward_step(batch_iter, model):
    """A forward step that skips the model's forward: only the schedule's own code runs."""
    next(batch_iter)
    out = model.embedding.word_embeddings.weight[:4].sum(dim=1)

    def loss_func(output):
        loss = output.mean()
        return loss, {"lm loss": loss.detach().clone()}

    return out, loss_func


def probe_gpt(rec: Recorder) -> None:
    """A megatron GPTModel (RoPE, causal mask) built and run directly, megatron's no-pipelining
    schedule on its own, and the schedule running the model: the losses agree, all params get grads."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    with rec.check("build"):
        model = _build_gpt(_tiny_gpt_config())
    batch = _gpt_batch()
    with rec.check("forward", fatal=False):
        loss = model(**batch)
        direct = loss.float().mean()
        direct.backward()
        rec.data["direct_loss"] = direct.item()
        rec.data["loss_shape"] = list(loss.shape)
        rec.data["params_without_grad"] = [n for n, p in model.named_parameters() if p.grad is None]
    model.zero_grad()
    schedule = get_forward_backward_func()
    with rec.check("schedule", fatal=False):
        losses = schedule(forward_step_func=_embedding_forward_step, data_iterator=iter([batch]),
                          model=[model], num_microbatches=1, seq_length=16, micro_batch_size=2)
        rec.data["embedding_schedule_loss"] = losses[0]["lm loss"].item()
        rec.data["embedding_expected_loss"] = model.embedding.word_embeddings.weight[:4].sum(1).mean().item()
        grad = model.embedding.word_embeddings.weight.grad
        rec.data["embedding_grad_rows"] = (grad.abs().sum(1) > 0).nonzero().flatten().tolist()
    model.zero_grad()
    if rec.checks["forward"]["ok"] and rec.checks["schedule"]["ok"]:
        with rec.check("schedule_model"):
            losses = schedule(forward_step_func=_forward_step, data_iterator=iter([batch]), model=[model],
                              num_microbatches=1, seq_length=16, micro_batch_size=2)
            rec.data["schedule_loss"] = losses[0]["lm loss"].item()
            rec.data["schedule_params_without_grad"] = [
                n for n, p in model.named_parameters() if p.grad is None]


def _moe_layer(dispatcher: str):
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec
    from megatron.core.transformer.spec_utils import build_module

    config = _tiny_gpt_config(num_layers=1, hidden_size=16, num_attention_heads=2, ffn_hidden_size=32,
                              num_moe_experts=4, moe_router_topk=2, moe_ffn_hidden_size=32,
                              expert_model_parallel_size=WORLD, add_bias_linear=False,
                              moe_token_dispatcher_type=dispatcher, moe_aux_loss_coeff=0.0,
                              moe_router_load_balancing_type="none")
    spec = get_moe_module_spec(use_te=False, num_experts=4, moe_grouped_gemm=False)
    return build_module(spec, config=config)


def probe_moe(rec: Recorder) -> None:
    """megatron MoELayer (TopKRouter, SequentialMLP experts) at EP=2 with the all-to-all token
    dispatcher; must equal the all-gather dispatcher with the same weights (outputs and input
    gradients), on different tokens per rank so that tokens really cross ranks."""
    import torch

    with rec.check("build"):
        alltoall = _moe_layer("alltoall")
        allgather = _moe_layer("allgather")
        allgather.load_state_dict(alltoall.state_dict())
    g = torch.Generator().manual_seed(100 + torch.distributed.get_rank())
    x = torch.randn(12, 1, 16, generator=g)
    outs = {}
    for name, layer in (("alltoall", alltoall), ("allgather", allgather)):
        with rec.check("forward" if name == "alltoall" else "reference"):
            xi = x.clone().requires_grad_(True)
            out, _ = layer(xi)
            (out * torch.arange(out.numel()).reshape(out.shape).float().cos()).sum().backward()
            outs[name] = (out.detach(), xi.grad)
    a, b = outs["alltoall"], outs["allgather"]
    rec.data["out_diff"] = (a[0] - b[0]).abs().max().item()
    rec.data["grad_diff"] = (a[1] - b[1]).abs().max().item()
    rec.data["out_norm"] = a[0].norm().item()
    rec.data["grad_norm"] = a[1].norm().item()


def probe_optimizer(rec: Recorder) -> None:
    """megatron DDP + DistributedOptimizer (torch Adam) on a GPTModel: build, and one clipped step
    whose grad norm matches the gradients."""
    import torch
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func

    config = _tiny_gpt_config()
    model = DistributedDataParallel(
        config=config, module=_build_gpt(config),
        ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                                 use_distributed_optimizer=True))
    with rec.check("build"):
        opt = get_megatron_optimizer(
            OptimizerConfig(optimizer="adam", lr=1e-2, clip_grad=1e-3, bf16=False,
                            params_dtype=torch.float32, use_distributed_optimizer=True), [model])
        inner = opt.chained_optimizers[0] if hasattr(opt, "chained_optimizers") else opt
        rec.data["optimizer_class"] = type(inner).__name__

    def step():
        model.zero_grad_buffer()
        opt.zero_grad()
        get_forward_backward_func()(forward_step_func=_forward_step, data_iterator=iter([_gpt_batch()]),
                                    model=[model], num_microbatches=1, seq_length=16,
                                    micro_batch_size=2, forward_only=False)
        # identical data on both DP ranks: the averaged gradient is this rank's gradient
        expected = sum(p.main_grad.double().pow(2).sum().item() for p in model.parameters()) ** 0.5
        finalize_model_grads([model])
        ok, grad_norm, _ = opt.step()
        return ok, grad_norm, expected

    with rec.check("step"):
        before = [p.detach().clone() for p in model.parameters()]
        ok, grad_norm, expected = step()
        rec.data.update(step_ok=bool(ok), grad_norm=float(grad_norm), expected_grad_norm=expected,
                        max_update=max((p - q).abs().max().item()
                                       for p, q in zip(model.parameters(), before)))


def probe_gather(rec: Recorder) -> None:
    """megatron's sequence-parallel gather with uneven split sizes (what the alltoall MoE dispatcher
    does over the expert-TP group): forward = concatenation, backward = this rank's slice."""
    import torch
    from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

    sizes, rank = [3, 5], torch.distributed.get_rank()
    x = torch.arange(sizes[rank] * 2, dtype=torch.float32).reshape(sizes[rank], 2).add(100 * rank)
    x.requires_grad_(True)
    with rec.check("forward"):
        out = gather_from_sequence_parallel_region(x, True, torch.distributed.group.WORLD, sizes)
        expected = torch.cat([torch.arange(n * 2, dtype=torch.float32).reshape(n, 2).add(100 * r)
                              for r, n in enumerate(sizes)])
        rec.data["gather_diff"] = (out - expected).abs().max().item()
        (out * torch.arange(out.numel()).reshape(out.shape)).sum().backward()
        start = sum(sizes[:rank])  # d/dx of the sum over both ranks' identical losses: 2 x weights
        weights = torch.arange(out.numel()).reshape(out.shape)[start:start + sizes[rank]].float()
        rec.data["grad_diff"] = (x.grad - 2 * weights).abs().max().item()


PROBES = {"rng": probe_rng, "gpt": probe_gpt, "moe": probe_moe, "optimizer": probe_optimizer,
          "gather": probe_gather}


def _rank_main(skip: tuple, probes: tuple, rank: int, port: int, out_path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank))
    import torch
    from megatron.core import parallel_state, tensor_parallel

    from megatron_vlm.runtime import cpu, megatron_fixes

    result = {"setup": None, "probes": {}}
    try:
        result["applied"] = sorted(cpu.apply(skip=skip))
        megatron_fixes.apply()  # as runtime.initialize does (CPU and GPU alike)
        torch.distributed.init_process_group("gloo", rank=rank, world_size=WORLD)
        parallel_state.initialize_model_parallel(expert_model_parallel_size=WORLD)
        if "rng" not in skip:
            tensor_parallel.model_parallel_cuda_manual_seed(SEED)
    except Exception:  # noqa: BLE001
        result["setup"] = traceback.format_exc()
    else:
        for name in probes:
            rec = Recorder()
            try:
                PROBES[name](rec)
            except _Stop:
                pass
            except Exception:  # noqa: BLE001 - a failure outside any sub-check
                rec.checks["unexpected"] = {"ok": False, "type": "", "message": traceback.format_exc(),
                                            "frames": []}
            result["probes"][name] = rec.result()
    Path(out_path).write_text(json.dumps(result))
    os._exit(0)  # no teardown: a failed collective must not hang the rank


def _run_case(skip: tuple, probes: tuple, tmp: Path) -> list:
    import multiprocessing as mp

    from megatron_vlm.runtime.launcher_env import free_port

    ctx = mp.get_context("fork")  # the driver holds imported megatron modules but no patch
    port = free_port()
    tag = "-".join(skip) or "all"
    paths = [tmp / f"{tag}.{r}.json" for r in range(WORLD)]
    procs = [ctx.Process(target=_rank_main, args=(skip, probes, r, port, str(paths[r])))
             for r in range(WORLD)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + CASE_TIMEOUT_S
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    out = []
    for r, p in enumerate(procs):
        if p.is_alive():
            p.kill()
            p.join()
            out.append({"setup": f"rank {r} timed out after {CASE_TIMEOUT_S}s", "probes": {}})
        elif not paths[r].exists():
            out.append({"setup": f"rank {r} exited with {p.exitcode} without a result", "probes": {}})
        else:
            out.append(json.loads(paths[r].read_text()))
    return out


def _idempotence_main(out_path: str) -> None:
    """apply() twice changes nothing: no second TorchFunctionMode, no wrapper around a wrapper."""
    import torch
    from megatron.core.transformer.moe import moe_utils

    from megatron_vlm.runtime import cpu

    def snapshot():
        return (torch.cuda.current_device, torch.Tensor.type, torch.Tensor.cuda, torch.cuda.Stream,
                torch.cuda.get_rng_state, moe_utils.maybe_move_tensor_to_cpu,
                len(torch.overrides._get_current_function_mode_stack()))

    r = {"first": cpu.apply(skip=("rng",))}
    before = snapshot()
    r["second"] = cpu.apply(skip=("rng",))
    unchanged = snapshot() == before
    r["third"] = cpu.apply()
    before = snapshot()
    r["fourth"] = cpu.apply()
    r["unchanged"] = unchanged and snapshot() == before
    r["modes"] = len(torch.overrides._get_current_function_mode_stack())
    r["single_wrap"] = not hasattr(torch.Tensor.type._megatron_vlm_original, "_megatron_vlm_original")
    r["type_name"] = torch.zeros(1).type()
    r["applied"] = sorted(cpu.applied())
    Path(out_path).write_text(json.dumps(r))
    os._exit(0)


def _driver(out_file: str) -> None:
    import tempfile

    import torch
    import megatron.core  # noqa: F401  imported once, before any fork
    from megatron.core import parallel_state, tensor_parallel  # noqa: F401
    from megatron.core.distributed import DistributedDataParallel  # noqa: F401
    from megatron.core.models.gpt import GPTModel  # noqa: F401
    from megatron.core.optimizer import get_megatron_optimizer  # noqa: F401
    from megatron.core.pipeline_parallel import get_forward_backward_func  # noqa: F401
    from megatron.core.transformer.moe import moe_layer, token_dispatcher  # noqa: F401

    from megatron_vlm.runtime import cpu

    assert not cpu.applied() and not torch.distributed.is_initialized()
    cases = {"all": ((), PROBE_NAMES)}
    for name, (probe, _) in EXPECTED_FAILURES.items():
        cases[name] = ((name,), (probe,))
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for case, (skip, probes) in cases.items():
            t0 = time.monotonic()
            results[case] = _run_case(skip, probes, Path(tmp))
            results[case][0]["seconds"] = round(time.monotonic() - t0, 2)
        import multiprocessing as mp

        child = mp.get_context("fork").Process(target=_idempotence_main, args=(f"{tmp}/idem.json",))
        child.start()
        child.join(CASE_TIMEOUT_S)
        if child.is_alive():
            child.kill()
        idem = Path(f"{tmp}/idem.json")
        results["idempotence"] = (json.loads(idem.read_text()) if idem.exists()
                                  else {"error": f"exit code {child.exitcode}"})
    Path(out_file).write_text(json.dumps(results, indent=1))


# ================================================================================================
# Test side
# ================================================================================================

@pytest.fixture(scope="module")
def probe_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("cpu_patches") / "results.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-m", "tests.unit.test_cpu_patches", str(out)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and out.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


def _probe(results, case: str, probe: str) -> list[dict]:
    ranks = results[case]
    for r, res in enumerate(ranks):
        assert res["setup"] is None, f"case {case!r} rank {r} setup failed:\n{res['setup']}"
    return [res["probes"][probe] for res in ranks]


def _assert_all_ok(per_rank: list[dict]) -> None:
    for r, res in enumerate(per_rank):
        bad = {k: v for k, v in res["checks"].items() if not v["ok"]}
        assert not bad, f"rank {r}: {bad}"


def _check_with_patch(name: str, per_rank: list[dict]) -> None:
    """What the full CPU layer must give for the code the patch ``name`` covers."""
    import torch

    _assert_all_ok(per_rank)
    data = [r["data"] for r in per_rank]
    if name in ("current_device", "device_args"):
        for d in data:
            assert d["loss_shape"] == [2, 16] and d["params_without_grad"] == []
            assert d["embedding_schedule_loss"] == pytest.approx(d["embedding_expected_loss"], rel=1e-6)
            assert d["embedding_grad_rows"] == [0, 1, 2, 3]
            assert d["schedule_loss"] == pytest.approx(d["direct_loss"], rel=1e-6)
            assert d["schedule_params_without_grad"] == []
    elif name == "rng":
        default = torch.rand(4, generator=torch.Generator().manual_seed(RNG_SEED))
        for rank, d in enumerate(data):  # the TP stream is really seeded, continues across forks
            tp = torch.rand(8, generator=torch.Generator().manual_seed(RNG_SEED + 2718 + rank))
            assert torch.allclose(torch.tensor(d["fork"]), tp), d
            assert torch.allclose(torch.tensor(d["outside"]), default), d  # default stream untouched
        assert data[0]["fork"] != data[1]["fork"]  # distinct streams per TP rank
    elif name in ("streams", "moe_split_sizes", "te_general_gemm"):
        for d in data:
            assert d["out_norm"] > 0 and d["grad_norm"] > 0
            assert d["out_diff"] <= 1e-6 and d["grad_diff"] <= 1e-6, d
    elif name == "uneven_all_gather":
        for d in data:
            assert d["gather_diff"] == 0 and d["grad_diff"] == 0, d
    elif name == "tensor_type_strings":
        for d in data:
            assert d["optimizer_class"] == "DistributedOptimizer" and d["step_ok"]
            assert d["grad_norm"] == pytest.approx(d["expected_grad_norm"], rel=1e-5)
            assert 0 < d["max_update"] < 0.1
    else:  # pragma: no cover - EXPECTED_FAILURES and this function must cover the same names
        raise AssertionError(f"no with-patch check for {name}")


def test_every_patch_has_a_probe():
    from megatron_vlm.runtime import cpu

    assert [p.name for p in cpu.PATCHES] == list(EXPECTED_FAILURES)


@pytest.mark.parametrize("name", list(EXPECTED_FAILURES))
def test_patch_is_needed(probe_results, name):
    probe, failures = EXPECTED_FAILURES[name]
    # (a) with the whole CPU layer: the covered megatron code works and gives the right numbers
    _check_with_patch(name, _probe(probe_results, "all", probe))
    # (b) without this one patch: exactly the expected sub-checks fail, each with its specific
    #     error raised inside the megatron-core function the patch covers
    for r, res in enumerate(_probe(probe_results, name, probe)):
        assert name not in probe_results[name][r]["applied"]
        failed = {k for k, v in res["checks"].items() if not v["ok"]}
        assert failed == set(failures), f"rank {r} without {name}: {res['checks']}"
        for check, (etype, text, frame) in failures.items():
            got = res["checks"][check]
            assert got["type"] == etype and text in got["message"], (r, check, got)
            assert frame in got["frames"], (r, check, got)


# ---- the apply() API ----------------------------------------------------------------------------

def test_apply_is_idempotent(probe_results):
    from megatron_vlm.runtime import cpu

    names = [p.name for p in cpu.PATCHES]
    r = probe_results["idempotence"]
    assert "error" not in r, r
    assert r["first"] == [n for n in names if n != "rng"]
    assert r["second"] == [] and r["third"] == ["rng"] and r["fourth"] == []
    assert r["unchanged"] and r["modes"] == 1 and r["single_wrap"]
    assert r["type_name"] == "torch.cuda.FloatTensor"
    assert r["applied"] == sorted(names)


def _untouched():
    """What apply() would change (compared before/after a refused call)."""
    import torch

    from megatron_vlm.runtime import cpu

    return (torch.cuda.current_device, torch.Tensor.type, torch.Tensor.cuda, torch.cuda.Stream,
            len(torch.overrides._get_current_function_mode_stack()), cpu.applied())


def test_apply_refuses_unknown_patch_names():
    from megatron_vlm.runtime import cpu

    before = _untouched()
    with pytest.raises(ValueError, match=r"unknown CPU patch name\(s\) \['no_such_patch'\]"):
        cpu.apply(skip=("rng", "no_such_patch"))
    assert _untouched() == before


def test_apply_refuses_on_cuda(monkeypatch):
    import torch

    from megatron_vlm.runtime import cpu

    before = _untouched()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(RuntimeError, match="must not be applied on a machine with CUDA"):
        cpu.apply()
    assert _untouched() == before


def test_version_guard(monkeypatch):
    import megatron.core.package_info as info

    from megatron_vlm.runtime import cpu

    assert cpu.check_megatron_version() == info.__version__
    before = _untouched()
    monkeypatch.setattr(info, "__version__", "0.99.0")
    with pytest.raises(RuntimeError, match=r"written for megatron-core \('0\.16\.1',\), found 0\.99\.0"):
        cpu.apply()
    assert _untouched() == before


if __name__ == "__main__":
    _driver(sys.argv[1])
