"""The arch contract, from the outside.

* An arch registered from this file alone (no edit anywhere else) trains through pretrain_vlm's code
  path (``training.cli.run``).
* The modality context reaches every decoder layer and the MLP slot through megatron's per-forward
  ``padding_mask`` channel, split along the sequence like the hidden states under TP=2 + SP: each
  rank's view equals its slice of the unsharded ids, and the modality-aware MLP of the toy arch gives
  the single-rank loss.
"""

import dataclasses
import json

import torch
from megatron.core.transformer.mlp import MLP
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_layer import TransformerLayer

from megatron_vlm.archs import ArchSpec, register_arch
from megatron_vlm.archs.joint_decoder.model import JointDecoderVLM
from megatron_vlm.data.batch import decode_modality_context
from megatron_vlm.data.layout import TokenLayout
from megatron_vlm.models import specs
from megatron_vlm.testing.configs import small_config
from megatron_vlm.testing.distributed import run_distributed

TOY = "toy_modality_scaled"
IMAGE_SCALE = 0.25
SEEN: list[tuple[str, torch.Tensor]] = []  # what the toy layers received, in this process


class RecordingLayer(TransformerLayer):
    """A plain decoder layer that records the modality context it is handed."""

    def forward(self, *args, **kwargs):
        SEEN.append(("layer", kwargs["padding_mask"].detach().clone()))
        return super().forward(*args, **kwargs)


class ModalityScaledMLP(MLP):
    """Dense MLP whose output at image tokens is scaled by IMAGE_SCALE: it needs the context."""

    def forward(self, hidden_states, padding_mask=None, **kwargs):
        SEEN.append(("mlp", padding_mask.detach().clone()))
        out, bias = super().forward(hidden_states, **kwargs)
        image = decode_modality_context(padding_mask).image.transpose(0, 1)  # [s(/tp), b]
        scale = torch.where(image, IMAGE_SCALE, 1.0).to(out.dtype).unsqueeze(-1)
        return out * scale, bias


def toy_block_spec(ctx):
    layer = specs.language_layer_spec(ctx.backend)
    mlp = ModuleSpec(module=ModalityScaledMLP, submodules=layer.submodules.mlp.submodules)
    layer = ModuleSpec(module=RecordingLayer, submodules=dataclasses.replace(layer.submodules, mlp=mlp))
    return specs.block_spec(ctx.config, layer, ctx.backend, ctx.vp_stage)


register_arch(ArchSpec(
    name=TOY,
    summary="test arch: joint decoder whose MLP scales image tokens",
    model_class=JointDecoderVLM,
    block_spec=toy_block_spec,
    token_layout=TokenLayout.INLINE,
))

ARGV = [
    "--data-path", "mock", "--arch", TOY, "--micro-batch-size", "2", "--global-batch-size", "2",
    "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--num-query-groups", "2",
    "--ffn-hidden-size", "48", "--seq-length", "24", "--vocab-size", "128",
    "--set", "model.vision.image_size=8", "--set", "model.vision.patch_size=4",
    "--set", "model.vision.hidden_size=16", "--set", "model.vision.num_layers=1",
    "--set", "model.vision.num_attention_heads=2", "--set", "model.vision.ffn_hidden_size=32",
    "--lr", "1e-3", "--seed", "3", "--transformer-impl", "local", "--log-interval", "1",
]


def _train(argv):
    from megatron_vlm.training.cli import run

    rc = run(argv)
    return rc, sorted({(where, tuple(t.shape)) for where, t in SEEN})


def test_toy_arch_from_a_test_file_trains_through_pretrain_vlm(tmp_path):
    (rc, seen), = run_distributed(_train, 1, ARGV + ["--train-iters", "2", "--log-dir", str(tmp_path)])
    assert rc == 0
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r.get("loss") is not None]
    assert len(losses) == 2 and all(0 < v < 20 for v in losses) and losses[0] != losses[1]
    # micro batch 2, sequence 24, 2 modalities: [b, s, M] in the layer and in the MLP slot
    assert seen == [("layer", (2, 24, 2)), ("mlp", (2, 24, 2))]


def _toy_batch(cfg):
    from megatron_vlm.data.mock import random_batch

    batch = random_batch(cfg.model, 2, seed=5)
    batch.padding_mask = torch.zeros_like(batch.tokens, dtype=torch.bool)
    batch.padding_mask[1, -7:] = True  # right padding on one sample
    return batch


def _toy_forward(cfg, weights_dir, save: bool):
    from megatron_vlm import runtime
    from megatron_vlm.training import checkpointing
    from megatron_vlm.training.step import build_model_chunks

    p = cfg.parallel
    runtime.initialize(tensor_model_parallel_size=p.tensor_model_parallel_size, seed=1)
    (model,) = build_model_chunks(cfg, wrap_ddp=False)
    if save:
        checkpointing.save_checkpoint(weights_dir, 0, [model])
    else:
        checkpointing.load_checkpoint(weights_dir, [model], load_rng=False)
    batch = _toy_batch(cfg)
    SEEN.clear()
    with torch.no_grad():
        loss = model(batch.model_inputs())  # per-token loss [b, s]
    return {"loss": loss, "seen": list(SEEN)}


def test_modality_context_reaches_layers_and_mlp_sharded_under_tp2_sp(tmp_path):
    cfg = small_config(language_layers=2)
    cfg.model.arch, cfg.model.backend = TOY, "local"
    (ref,) = run_distributed(_toy_forward, 1, cfg, str(tmp_path / "w"), True)
    cfg.parallel.tensor_model_parallel_size, cfg.parallel.sequence_parallel = 2, True
    ranks = run_distributed(_toy_forward, 2, cfg, str(tmp_path / "w"), False)

    batch = _toy_batch(cfg)
    ids, pad = batch.modality_ids, batch.padding_mask
    s = ids.shape[1]
    assert (ids == 0).any() and (ids == 1).any() and pad.any()
    for rank, out in enumerate(ranks):
        sl = slice(rank * s // 2, (rank + 1) * s // 2)
        wheres = [w for w, _ in out["seen"]]
        assert wheres == ["layer", "mlp"] * 2, wheres  # every layer, then its MLP slot
        for where, ctx in out["seen"]:
            if where == "mlp":  # the MLP slot sees it as the layer does: [b, s/tp, M]
                assert ctx.shape == (2, s // 2, 2), ctx.shape
            view = decode_modality_context(ctx)
            assert torch.equal(view.padding, pad[:, sl]), (rank, where)
            assert torch.equal(view.modality_ids[~view.padding], ids[:, sl][~pad[:, sl]]), (rank, where)
        # the modality-aware MLP gives the single-rank result only if each rank had its own slice
        diff = (out["loss"] - ref["loss"]).abs().max().item()
        assert diff <= 1e-5 * ref["loss"].abs().max().item(), (rank, diff)
