"""The MoT layer against a naive per-token reference written here (plain torch: one token at a time
through its modality's weights, attention as an explicit causal loop with GQA and RoPE), output and
every gradient; warm start from the dense model (``ArchSpec.from_dense``) computes exactly the dense
joint_decoder; ``convert_checkpoint.py upcycle --arch mot`` copies each dense tensor into every
modality (fp32, world of 1)."""

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_vlm.testing.configs import small_config
from megatron_vlm.testing.cli import TINY_ARGV, pretrain, read_checkpoint
from megatron_vlm.testing.distributed import run_distributed

ROOT = Path(__file__).resolve().parents[2]
NAMES = ("image", "text")
SEQ, BATCH = 14, 2


def mot_config(untie_norms=True, qk_norm=False):
    cfg = small_config(language_layers=2)
    cfg.model.arch, cfg.model.backend = "mot", "local"
    cfg.model.mot.untie_norms, cfg.model.mot.qk_norm = untie_norms, qk_norm
    return cfg


def _context(text_only=False):
    """[b, s, 2] one-hot, image tokens in both samples (none if ``text_only``: the image weights
    then see no token), right padding (all False) in sample 1."""
    ids = torch.ones(BATCH, SEQ, dtype=torch.long)
    if not text_only:
        ids[0, 1:6] = 0
        ids[1, 3:5] = 0
        ids[1, 9] = 0
    ctx = ids.unsqueeze(-1) == torch.arange(2)
    ctx[1, -4:] = False
    return ctx


# ------------------------------------------------------------------------------------------------
# Naive reference
# ------------------------------------------------------------------------------------------------

def _rms(x, w, eps):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _rope(x, pos, base):
    """x [heads, d] at position pos: rotate-half RoPE (Llama / megatron non-interleaved)."""
    d = x.shape[-1]
    inv = 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    ang = torch.cat([pos * inv, pos * inv])
    x1, x2 = x[..., :d // 2], x[..., d // 2:]
    return x * torch.cos(ang) + torch.cat([-x2, x1], dim=-1) * torch.sin(ang)


def naive_layer(x, ids, P, heads, groups, eps, base, untie_norms, qk_norm):
    """x [s, b, h]; ids [s, b] (modality per token, text at padding); P: the layer's parameters by
    state-dict name. One token at a time."""
    s, b, h = x.shape
    d = h // heads
    per_group = heads // groups

    def norm(kind, m):
        return P[f"{kind}.{NAMES[m]}.weight"] if untie_norms else P[f"{kind}.weight"]

    out = torch.zeros_like(x)
    for j in range(b):
        q, k, v = [], [], []
        for t in range(s):
            m = int(ids[t, j])
            y = _rms(x[t, j], norm("input_layernorm", m), eps)
            qkv = (P[f"self_attention.linear_qkv.{NAMES[m]}.weight"] @ y).view(groups, per_group + 2, d)
            qt, kt, vt = qkv[:, :per_group].reshape(heads, d), qkv[:, per_group], qkv[:, per_group + 1]
            if qk_norm:
                qt = _rms(qt, P[f"self_attention.q_layernorm.{NAMES[m]}.weight"], eps)
                kt = _rms(kt, P[f"self_attention.k_layernorm.{NAMES[m]}.weight"], eps)
            q.append(_rope(qt, t, base))
            k.append(_rope(kt, t, base))
            v.append(vt)
        for t in range(s):
            m = int(ids[t, j])
            heads_out = []
            for hd in range(heads):
                g = hd // per_group
                scores = torch.stack([q[t][hd] @ k[u][g] for u in range(t + 1)]) / math.sqrt(d)
                p = torch.softmax(scores, dim=0)
                heads_out.append(sum(p[u] * v[u][g] for u in range(t + 1)))
            a = x[t, j] + P[f"self_attention.linear_proj.{NAMES[m]}.weight"] @ torch.cat(heads_out)
            y = _rms(a, norm("pre_mlp_layernorm", m), eps)
            gate_up = P[f"mlp.{NAMES[m]}.linear_fc1.weight"] @ y
            f = gate_up.shape[0] // 2
            hidden = torch.nn.functional.silu(gate_up[:f]) * gate_up[f:]
            out[t, j] = a + P[f"mlp.{NAMES[m]}.linear_fc2.weight"] @ hidden
    return out


def _layer_vs_naive(untie_norms, qk_norm, text_only=False):
    from megatron_vlm import runtime
    from megatron_vlm.data.batch import decode_modality_context
    from megatron_vlm.models import build_model

    runtime.initialize(seed=11)
    cfg = mot_config(untie_norms, qk_norm)
    model = build_model(cfg, dtype=torch.float32).eval()
    layer = model.language_model.decoder.layers[1]
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in layer.named_parameters():  # norms too: untied copies must differ
            p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g) if "norm" in name else
                    0.1 * torch.randn(p.shape, generator=g))
    h = cfg.model.language.hidden_size
    x = torch.randn(SEQ, BATCH, h, generator=g, requires_grad=True)
    ctx = _context(text_only)
    rope = model.language_model.rotary_pos_emb(SEQ)
    w = torch.randn(SEQ, BATCH, h, generator=g)

    out, _ = layer(hidden_states=x, attention_mask=None, rotary_pos_emb=rope, padding_mask=ctx)
    (out * w).sum().backward()

    lang = cfg.model.language
    params = {n: p.detach().clone().requires_grad_(True) for n, p in layer.named_parameters()}
    xr = x.detach().clone().requires_grad_(True)
    ids = decode_modality_context(ctx).modality_ids.t()
    args = (lang.num_attention_heads, lang.num_query_groups, lang.layernorm_epsilon, lang.rotary_base,
            untie_norms, qk_norm)
    ref = naive_layer(xr, ids, params, *args)
    (ref * w).sum().backward()
    with torch.no_grad():  # control: other modalities must give something else
        all_text = naive_layer(xr, torch.ones_like(ids) - int(text_only), params, *args)
    zero = torch.zeros(())
    grads = {n: ((p.grad - (params[n].grad if params[n].grad is not None else zero)).abs().max()
                 / (params[n].grad.abs().max() if params[n].grad is not None else 1.0)).item()
             for n, p in layer.named_parameters()}  # p.grad None: a parameter the step did not reach
    return {"out": (out - ref).abs().max().item(), "scale": ref.abs().max().item(),
            "x_grad": ((x.grad - xr.grad).abs().max() / xr.grad.abs().max()).item(),
            "grads": grads, "control": (all_text - ref).abs().max().item(),
            "nonzero": sum(int(p.grad is not None and p.grad.abs().max() > 0) for p in params.values()),
            "image_grads_zero": all(p.grad.abs().max() == 0 for n, p in layer.named_parameters() if ".image." in n)}


@pytest.mark.parametrize("untie_norms,qk_norm", [(True, True), (False, False)])
def test_layer_matches_naive_per_token_reference(untie_norms, qk_norm):
    (r,) = run_distributed(_layer_vs_naive, 1, untie_norms, qk_norm)
    print(f"mot layer vs naive: out {r['out']:.2e} (scale {r['scale']:.2f}), x grad {r['x_grad']:.2e}, "
          f"worst param grad {max(r['grads'].values()):.2e}, control {r['control']:.2e}")
    assert r["out"] <= 1e-5 * r["scale"], r
    assert r["x_grad"] <= 1e-5, r
    expected = 4 + 2 * 2 + (4 if qk_norm else 0) + (4 if untie_norms else 2)
    assert len(r["grads"]) == expected and r["nonzero"] == expected, r
    assert max(r["grads"].values()) <= 1e-5, r["grads"]
    assert r["control"] > 1e-2, r  # the comparison can fail: modality routing matters


def test_layer_with_a_modality_without_tokens():
    """A text-only micro batch: the image weights get exact zero gradients, the rest as the reference."""
    (r,) = run_distributed(_layer_vs_naive, 1, True, True, True)
    assert r["out"] <= 1e-5 * r["scale"] and r["x_grad"] <= 1e-5, r
    assert r["image_grads_zero"] and max(r["grads"][n] for n in r["grads"] if ".text." in n) <= 1e-5, r
    assert r["control"] > 1e-2, r


# ------------------------------------------------------------------------------------------------
# Warm start from the dense model
# ------------------------------------------------------------------------------------------------

def _warm_start_logits(untie_norms):
    from megatron_vlm import runtime
    from megatron_vlm.archs import get_arch
    from megatron_vlm.data.mock import random_batch
    from megatron_vlm.models import build_model

    runtime.initialize(seed=5)
    mot_cfg = mot_config(untie_norms)
    dense_cfg = mot_config()
    dense_cfg.model.arch = "joint_decoder"
    dense = build_model(dense_cfg, dtype=torch.float32).eval()
    mot = build_model(mot_cfg, dtype=torch.float32).eval()
    spec = get_arch("mot")
    target = {k: v for k, v in mot.state_dict(keep_vars=True).items() if not k.endswith("_extra_state")}
    filled = {}
    with torch.no_grad():
        for key, t in dense.state_dict().items():
            if key.endswith("_extra_state"):
                continue
            for dst in spec.from_dense(mot_cfg.model, key):
                target[dst].copy_(t)
                filled[dst] = key
    batch = random_batch(mot_cfg.model, 2, seed=3)
    batch.padding_mask = torch.zeros_like(batch.tokens, dtype=torch.bool)
    batch.padding_mask[1, -5:] = True
    inputs = batch.model_inputs(with_labels=False)
    with torch.no_grad():
        a, b = dense(inputs), mot(inputs)
    return {"missing": sorted(set(target) - set(filled)), "diff": (a - b).abs().max().item(),
            "equal": torch.equal(a, b), "copies": len(filled), "dense": len(dense.state_dict())}


@pytest.mark.parametrize("untie_norms", [True, False])
def test_warm_start_from_dense_is_the_dense_model(untie_norms):
    (r,) = run_distributed(_warm_start_logits, 1, untie_norms)
    print(f"warm start untie_norms={untie_norms}: logits max diff {r['diff']:.2e}, equal {r['equal']}")
    assert r["missing"] == [], r["missing"]
    assert r["equal"] or r["diff"] <= 1e-6, r


# ------------------------------------------------------------------------------------------------
# Upcycle a joint_decoder checkpoint (made through pretrain_vlm's path)
# ------------------------------------------------------------------------------------------------

def test_upcycle_joint_decoder_checkpoint_into_mot(tmp_path):
    dense, mot = tmp_path / "dense", tmp_path / "mot"
    (rc,) = run_distributed(pretrain, 1, TINY_ARGV + ["--arch", "joint_decoder", "--train-iters", "1",
                                                      "--save", str(dense)])
    assert rc == 0
    proc = subprocess.run([sys.executable, "tools/convert_checkpoint.py", "upcycle", "--load", str(dense),
                           "--save", str(mot), "--arch", "mot"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (d,) = run_distributed(read_checkpoint, 1, str(dense))
    (m,) = run_distributed(read_checkpoint, 1, str(mot))
    layer = "language_model.decoder.layers.{}."
    untied = ["input_layernorm.{}.weight", "self_attention.linear_qkv.{}.weight",
              "self_attention.linear_proj.{}.weight", "pre_mlp_layernorm.{}.weight",
              "mlp.{}.linear_fc1.weight", "mlp.{}.linear_fc2.weight"]
    for i in range(2):
        for pattern in untied:
            src = d[layer.format(i) + pattern.replace(".{}", "")]
            for name in NAMES:
                assert torch.equal(m[layer.format(i) + pattern.format(name)], src), (i, pattern, name)
    carried = [k for k in d if ".decoder.layers." not in k or k.startswith("vision_model.")]
    assert len(carried) > 10 and all(torch.equal(m[k], d[k]) for k in carried)
    assert set(m) == set(carried) | {layer.format(i) + p.format(n) for i in range(2) for p in untied for n in NAMES}
