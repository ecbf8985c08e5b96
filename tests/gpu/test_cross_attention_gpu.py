"""cross_attention arch on a CUDA device (skipped without one): HF parity and bit-exact identity at
init with the local backend in fp32, a bf16 training step, the generation cache, and the same for
the Transformer Engine backend when TE is installed."""

import pytest
import torch

from megatron_vlm import runtime
from megatron_vlm.archs.cross_attention.hf_mllama_text import hf_text_to_megatron
from megatron_vlm.models.backends import te_available
from tests.unit.test_cross_attention import (
    HF_VOCAB, PARITY_TOL, _set_hf_gates, ca_config, fwd, hf_forward, hf_model, image_batch, inputs,
    set_gates, text_only_twin)
from tests.unit.test_cross_attention import build as build_cpu_default

pytestmark = [pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
              pytest.mark.usefixtures("fp32_matmuls", "single_rank")]


@pytest.fixture(scope="module")
def fp32_matmuls():
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def cuda(*tensors):
    return [t.cuda() for t in tensors]


def build(cfg, seed=0):
    # megatron's parallel linears allocate on the GPU; torch norms, the ViT conv and the gates are
    # created on the host: move the whole module (as Megatron-LM's get_model does)
    return build_cpu_default(cfg, seed).cuda()


@pytest.mark.parametrize("gates", ["zero", "open_hf_rows"])
def test_hf_parity_cuda(gates):
    cfg = ca_config()
    hf = hf_model(cfg).cuda()
    model = build(cfg)
    model.load_state_dict(hf_text_to_megatron(hf.state_dict(), cfg.model), strict=False)
    if gates != "zero":
        _set_hf_gates(hf)
        set_gates(model)
        model.set_text_rows_without_image("hf")
    tokens, pos, feats, tim, image_mask = cuda(*inputs(cfg))
    ref = hf_forward(hf, tokens, feats, tim, image_mask, cfg.model.num_image_tokens)
    with torch.no_grad():
        ours = fwd(model, tokens, pos, image_mask=image_mask, text_image_mask=tim, cross_attention_states=feats)
    diff = (ours[..., :HF_VOCAB] - ref).abs().max().item()
    print(f"CUDA HF parity ({gates}): max abs diff {diff:.3e}")
    assert diff <= PARITY_TOL


@pytest.mark.parametrize("backend", ["local", "te"])
def test_identity_at_init_and_training_step(backend):
    if backend == "te" and not te_available():
        pytest.skip("Transformer Engine is not installed")
    cfg = ca_config(num_layers=6, layers=(1, 4))
    cfg.model.backend = backend
    text_cfg = text_only_twin(cfg)
    text_cfg.model.backend = backend
    text, model = build(text_cfg, seed=5), build(cfg, seed=6)
    model.load_text_decoder(text.state_dict())
    tokens, pos, images, tim, image_mask, labels = cuda(*image_batch(cfg))
    with torch.no_grad():
        assert torch.equal(fwd(model, tokens, pos, images=images, image_mask=image_mask, text_image_mask=tim),
                           fwd(text, tokens, pos))
    model.train()
    loss = fwd(model, tokens, pos, images=images, image_mask=image_mask, text_image_mask=tim, labels=labels).mean()
    loss.backward()
    for layer in model.cross_attention_layers():
        assert layer.cross_attn_attn_gate.grad.abs().item() > 0
        assert layer.cross_attn_mlp_gate.grad.abs().item() > 0


def test_bf16_step_and_decode_cache():
    """bf16 as the trainer runs it: built in bf16 and wrapped in megatron's Float16Module."""
    from megatron.core.inference.contexts import StaticInferenceContext
    from megatron.core.transformer.module import Float16Module
    from megatron_vlm.models import build_model

    cfg = ca_config(num_layers=6, layers=(1, 4))
    cfg.training.bf16 = True
    runtime.set_seed(0)
    inner = build_model(cfg)
    set_gates(inner)
    model = Float16Module(inner.config, inner).cuda()
    tokens, pos, images, tim, image_mask, labels = cuda(*image_batch(cfg))
    loss = fwd(model, tokens, pos, images=images, image_mask=image_mask, text_image_mask=tim, labels=labels).mean()
    loss.backward()
    assert torch.isfinite(loss)
    assert all(l.cross_attn_attn_gate.grad.abs().item() > 0 for l in inner.cross_attention_layers())
    model.eval()
    s = tokens.shape[1]
    with torch.no_grad():
        full = fwd(model, tokens, pos, images=images, image_mask=image_mask, text_image_mask=tim)
        ctx = StaticInferenceContext(max_batch_size=2, max_sequence_length=s)
        fwd(model, tokens[:, :s - 1], pos[:, :s - 1], images=images, image_mask=image_mask,
              text_image_mask=tim[:, :s - 1], inference_context=ctx)
        ctx.sequence_len_offset = s - 1
        step = fwd(model, tokens[:, s - 1:], pos[:, s - 1:], image_mask=image_mask, text_image_mask=tim[:, s - 1:],
                     inference_context=ctx)
    diff = (step[:, -1].float() - full[:, -1].float()).abs().max().item()
    print(f"bf16 decode-with-cache vs full forward: max abs diff {diff:.3e}")
    assert diff < 0.1
