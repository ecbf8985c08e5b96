"""cross_attention arch (Mllama layout), single process: placement, identity at init / warm start,
trainability, HF MllamaForCausalLM parity (gates 0 and nonzero), masks and bad input, generation
cache, checkpoint round trip of the gates, te spec structure.

HF weights map into the model with ``megatron_vlm.archs.cross_attention.hf_mllama_text.hf_text_to_megatron``
(layer i -> layer i; q/k/v_proj -> linear_qkv per query group; cross_attn.k/v_proj -> linear_kv
per group [k_g; v_g]; q_norm/k_norm -> cross_attention.q_layernorm/k_layernorm; gates by name;
gate/up_proj -> linear_fc1; post_attention_layernorm -> pre_mlp_layernorm; embedding keeps its
vocab+8 rows, lm_head is padded to the Megatron vocab).
"""

import pytest
import torch

from megatron_vlm import runtime
from megatron_vlm.config import Config
from megatron_vlm.archs.cross_attention.config import cross_attention_layer_indices, text_layer_indices
from megatron_vlm.archs.cross_attention.hf_mllama_text import hf_text_to_megatron, megatron_to_hf_text
from megatron_vlm.archs.cross_attention.layers import GatedCrossAttentionLayer, cross_attention_layer_spec
from megatron_vlm.data.batch import ModelInputs
from megatron_vlm.models import build_model
from megatron_vlm.testing.distributed import run_distributed

HF_VOCAB = 120  # HF text vocab; Megatron vocab = HF vocab + 8 (Mllama's extra embedding rows)
PARITY_TOL = 1e-4


def ca_config(num_layers=5, layers=(1, 3), every=None, vocab=HF_VOCAB + 8, seq=12) -> Config:
    cfg = Config()
    cfg.model.arch = "cross_attention"
    cfg.model.backend = "local"
    lang, v = cfg.model.language, cfg.model.vision_encoder
    lang.num_layers, lang.hidden_size, lang.num_attention_heads, lang.num_query_groups = num_layers, 64, 4, 2
    lang.ffn_hidden_size, lang.vocab_size, lang.seq_length = 96, vocab, seq
    v.num_layers, v.hidden_size, v.num_attention_heads, v.ffn_hidden_size = 1, 32, 4, 64
    v.image_size, v.patch_size = 8, 4  # 4 image tokens per image
    cfg.model.cross_attention.layers = list(layers) if layers is not None else None
    if every is not None:
        cfg.model.cross_attention.every = every
    return cfg


pytestmark = pytest.mark.usefixtures("single_rank")


def build(cfg, seed=0):
    runtime.set_seed(seed)
    return build_model(cfg).eval()


def fwd(model, tokens, pos, inference_context=None, **inputs):
    """The model's one-call contract: ``model(ModelInputs(...))``."""
    return model(ModelInputs(tokens, pos, **inputs), inference_context=inference_context)


def set_gates(model, attn=0.7, mlp=-0.5):
    step = 0.1 if attn or mlp else 0.0
    with torch.no_grad():
        for i, layer in enumerate(model.cross_attention_layers()):
            layer.cross_attn_attn_gate.fill_(attn + step * i)
            layer.cross_attn_mlp_gate.fill_(mlp - step * i)


def inputs(cfg, b=2, n=2, seed=0):
    """tokens, position ids, image features [b, n*k, h], text_image_mask [b, s, n], image_mask [b, n].
    Sample 0: image 0 from position 3, image 1 from position 6 (rows 0-2 see no image).
    Sample 1: image 0 from position 0, image 1 padded (absent)."""
    g = torch.Generator().manual_seed(seed)
    s, k, h = cfg.model.language.seq_length, cfg.model.num_image_tokens, cfg.model.language.hidden_size
    tokens = torch.randint(0, HF_VOCAB, (b, s), generator=g)
    pos = torch.arange(s).expand(b, s).clone()
    feats = torch.randn(b, n * k, h, generator=g)
    tim = torch.zeros(b, s, n, dtype=torch.bool)
    tim[0, 3:, 0] = True
    tim[0, 6:, 1] = True
    tim[1, :, 0] = True
    tim[1, 4:, 1] = True  # allowed by text, but the image is padded
    image_mask = torch.tensor([[True, True], [True, False]])
    return tokens, pos, feats, tim, image_mask


# ------------------------------------------------------------------------------------------------
# Placement
# ------------------------------------------------------------------------------------------------

def test_default_cadence_matches_mllama_layout():
    assert cross_attention_layer_indices(40, 4) == [3, 8, 13, 18, 23, 28, 33, 38]  # Llama-3.2-11B-Vision
    assert cross_attention_layer_indices(100, 4) == list(range(3, 100, 5))  # Llama-3.2-90B-Vision
    assert cross_attention_layer_indices(4, 1) == [0, 2]
    assert cross_attention_layer_indices(4, 4, [3, 1]) == [1, 3]  # explicit list wins
    assert text_layer_indices(5, [1, 3]) == [0, 2, 4]
    with pytest.raises(ValueError, match="places no cross-attention layer"):
        cross_attention_layer_indices(3, 4)
    with pytest.raises(ValueError, match="distinct indices"):
        cross_attention_layer_indices(4, None, [1, 1])
    with pytest.raises(ValueError, match="distinct indices"):
        cross_attention_layer_indices(4, None, [4])


def test_model_layout_and_state_dict_keys():
    model = build(ca_config(num_layers=10, layers=None, every=4))
    assert model.cross_attention_layer_indices == [3, 8]
    kinds = ["ca" if isinstance(l, GatedCrossAttentionLayer) else "sa" for l in model.language_model.decoder.layers]
    assert kinds == ["sa"] * 3 + ["ca"] + ["sa"] * 4 + ["ca", "sa"]
    keys = {k[len("language_model.decoder.layers.3."):] for k in model.state_dict()
            if k.startswith("language_model.decoder.layers.3.") and not k.endswith("_extra_state")}
    assert keys == {
        "input_layernorm.weight", "cross_attention.linear_q.weight", "cross_attention.linear_kv.weight",
        "cross_attention.q_layernorm.weight", "cross_attention.k_layernorm.weight",
        "cross_attention.linear_proj.weight", "cross_attn_attn_gate", "pre_mlp_layernorm.weight",
        "mlp.linear_fc1.weight", "mlp.linear_fc2.weight", "cross_attn_mlp_gate"}
    for layer in model.cross_attention_layers():
        assert layer.cross_attn_attn_gate.item() == 0 and layer.cross_attn_mlp_gate.item() == 0
        assert layer.cross_attention.linear_proj.weight.abs().max() > 0  # not zero-initialised
    assert model.pipeline_seq_length() == 12  # PP=1: text only


def test_te_spec_structure():
    spec = cross_attention_layer_spec("te")
    from megatron.core.extensions import transformer_engine as te
    from megatron.core.transformer.identity_op import IdentityOp

    sub = spec.submodules
    assert spec.module is GatedCrossAttentionLayer
    assert sub.input_layernorm is IdentityOp and sub.pre_mlp_layernorm is IdentityOp  # fused into linears
    attn = sub.cross_attention.submodules
    assert attn.linear_q is te.TELayerNormColumnParallelLinear
    assert attn.core_attention is te.TEDotProductAttention
    assert sub.mlp.submodules.linear_fc1 is te.TELayerNormColumnParallelLinear
    with pytest.raises(ValueError):
        cross_attention_layer_spec("bogus")


# ------------------------------------------------------------------------------------------------
# HF parity
# ------------------------------------------------------------------------------------------------

def hf_model(cfg, seed=0):
    transformers = pytest.importorskip("transformers")
    from transformers import MllamaForCausalLM, MllamaTextConfig

    lang = cfg.model.language
    hcfg = MllamaTextConfig(
        vocab_size=HF_VOCAB, hidden_size=lang.hidden_size, intermediate_size=lang.ffn_hidden_size,
        num_hidden_layers=lang.num_layers, num_attention_heads=lang.num_attention_heads,
        num_key_value_heads=lang.num_query_groups, cross_attention_layers=list(cfg.model.cross_attention.layers),
        rms_norm_eps=lang.layernorm_epsilon, rope_parameters={"rope_type": "default", "rope_theta": lang.rotary_base},
        tie_word_embeddings=False, pad_token_id=None, bos_token_id=1, eos_token_id=2,
        initializer_range=0.1)
    hcfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = MllamaForCausalLM(hcfg).eval()
    with torch.no_grad():  # non-trivial norm weights, so a misplaced norm cannot go unnoticed
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
    return model


def hf_forward(hf, tokens, feats, tim, image_mask, k):
    from transformers.models.mllama.modeling_mllama import _prepare_cross_attention_mask

    mask = (tim & image_mask[:, None, :]).long()[..., None]  # [b, s, n, tiles=1]
    cam, full_row = _prepare_cross_attention_mask(mask, num_vision_tokens=k, dtype=torch.float32)
    with torch.no_grad():
        return hf(input_ids=tokens, cross_attention_states=feats, cross_attention_mask=cam,
                  full_text_row_masked_out_mask=full_row, use_cache=False).logits


def ours_forward(model, tokens, pos, feats, tim, image_mask):
    with torch.no_grad():
        return fwd(model, tokens, pos, image_mask=image_mask, text_image_mask=tim,
                     cross_attention_states=feats)[..., :HF_VOCAB]


@pytest.fixture(scope="module")
def hf_pair():
    cfg = ca_config()
    hf = hf_model(cfg)
    model = build(cfg)
    missing, unexpected = model.load_state_dict(hf_text_to_megatron(hf.state_dict(), cfg.model), strict=False)
    assert not unexpected
    assert all(k.startswith(("vision_", "language_model.decoder.layers")) and
               (k.startswith("vision_") or k.endswith("_extra_state")) for k in missing), missing
    return cfg, hf, model


def _set_hf_gates(hf, attn=0.7, mlp=-0.5):
    step = 0.1 if attn or mlp else 0.0
    with torch.no_grad():
        for i, idx in enumerate(hf.config.cross_attention_layers):
            hf.model.layers[idx].cross_attn_attn_gate.fill_(attn + step * i)
            hf.model.layers[idx].cross_attn_mlp_gate.fill_(mlp - step * i)


PARITY_RESULTS = {}


@pytest.mark.parametrize("case", ["gates0", "gates_hf_rows", "gates_all_rows_see_image", "text_only"])
def test_hf_parity(hf_pair, case):
    cfg, hf, model = hf_pair
    k = cfg.model.num_image_tokens
    tokens, pos, feats, tim, image_mask = inputs(cfg)
    model.set_text_rows_without_image("zero")
    if case == "gates0":
        _set_hf_gates(hf, 0.0, 0.0)
        set_gates(model, 0.0, 0.0)
    else:
        _set_hf_gates(hf)
        set_gates(model)
    if case == "gates_hf_rows":
        model.set_text_rows_without_image("hf")  # HF's behaviour on rows without image
    if case == "gates_all_rows_see_image":  # default ("zero") mode == HF wherever a row sees an image
        tim[:, :, 0] = True
    if case == "text_only":
        _set_hf_gates(hf)
        set_gates(model)
        with torch.no_grad():
            ref = hf(input_ids=tokens, use_cache=False).logits
            ours = fwd(model, tokens, pos)[..., :HF_VOCAB]
    else:
        ref = hf_forward(hf, tokens, feats, tim, image_mask, k)
        ours = ours_forward(model, tokens, pos, feats, tim, image_mask)
    diff = (ours - ref).abs().max().item()
    PARITY_RESULTS[case] = diff
    print(f"HF parity {case}: max abs diff {diff:.3e} (logit scale {ref.abs().max().item():.2f})")
    assert diff <= PARITY_TOL, (case, diff)
    if case in ("gates_hf_rows", "gates_all_rows_see_image"):  # the cross-attention path really counts
        with torch.no_grad():
            text_only = fwd(model, tokens, pos)[..., :HF_VOCAB]
        assert (text_only - ref).abs().max() > 1e-2


def test_default_rows_without_image_differ_from_hf_only_there(hf_pair):
    """Default mode zeroes rows that see no image (Meta's reference); HF 5.23 lets their attention
    branch through. Sample 1 sees an image on every row: identical to HF."""
    cfg, hf, model = hf_pair
    model.set_text_rows_without_image("zero")
    _set_hf_gates(hf)
    set_gates(model)
    tokens, pos, feats, tim, image_mask = inputs(cfg)
    ref = hf_forward(hf, tokens, feats, tim, image_mask, cfg.model.num_image_tokens)
    ours = ours_forward(model, tokens, pos, feats, tim, image_mask)
    assert (ours[1] - ref[1]).abs().max() <= PARITY_TOL
    assert (ours[0, :3] - ref[0, :3]).abs().max() > 1e-3


def test_conversion_round_trip_is_lossless(hf_pair):
    cfg, hf, model = hf_pair
    back = megatron_to_hf_text(model.state_dict(), cfg.model, hf_vocab_size=HF_VOCAB)
    ref = hf.state_dict()
    assert set(back) == set(ref)
    for key, value in ref.items():
        assert torch.equal(back[key], value), key


# ------------------------------------------------------------------------------------------------
# Identity at init / warm start / trainability
# ------------------------------------------------------------------------------------------------

def text_only_twin(cfg):
    """The same decoder without CA layers: a joint_decoder (plain GPT) with the self-attention layers."""
    text = ca_config(num_layers=cfg.model.language.num_layers - len(cfg.model.cross_attention.layers))
    text.model.arch = "joint_decoder"
    return text


def image_batch(cfg, b=2, n=2, seed=3):
    tokens, pos, _, tim, image_mask = inputs(cfg, b=b, n=n, seed=seed)
    g = torch.Generator().manual_seed(seed)
    v = cfg.model.vision_encoder
    images = torch.randn(b, n, 3, v.image_size, v.image_size, generator=g)
    labels = torch.roll(tokens, -1, dims=1)
    return tokens, pos, images, tim, image_mask, labels


def test_identity_at_init_and_warm_start_bit_exact():
    """A text-only decoder warm-started into the CA arch: logits and per-token loss at step 0 are
    bit-for-bit those of the text-only decoder, although the images are attended."""
    cfg = ca_config(num_layers=6, layers=(1, 4))
    text = build(text_only_twin(cfg), seed=5)
    model = build(cfg, seed=6)
    model.load_text_decoder(text.state_dict())
    tokens, pos, images, tim, image_mask, labels = image_batch(cfg)
    with torch.no_grad():
        ref_logits = fwd(text, tokens, pos)
        ref_loss = fwd(text, tokens, pos, labels=labels)
        logits = fwd(model, tokens, pos, images=images, image_mask=image_mask, text_image_mask=tim)
        loss = fwd(model, tokens, pos, images=images, image_mask=image_mask, text_image_mask=tim, labels=labels)
        set_gates(model)  # sanity: with open gates the images do change the output
        opened = fwd(model, tokens, pos, images=images, image_mask=image_mask, text_image_mask=tim)
    assert torch.equal(logits, ref_logits)
    assert torch.equal(loss, ref_loss)
    assert (opened - ref_logits).abs().max() > 1e-3


def test_load_text_decoder_rejects_mismatch():
    cfg = ca_config(num_layers=6, layers=(1, 4))
    bigger = ca_config(num_layers=6)
    bigger.model.arch = "joint_decoder"
    with pytest.raises(ValueError, match="self-attention layers"):
        build(cfg).load_text_decoder(build(bigger).state_dict())


def _grads(model):
    out = {}
    for layer in model.cross_attention_layers():
        for name, p in layer.named_parameters():
            out[f"{layer.layer_number - 1}.{name}"] = (p.grad.abs().max().item() if p.grad is not None else 0.0)
    return out


def test_trainability_gates_first_then_branches():
    cfg = ca_config(num_layers=6, layers=(1, 4))
    model = build(cfg, seed=2).train()
    tokens, pos, images, tim, image_mask, labels = image_batch(cfg)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)

    def step():
        opt.zero_grad(set_to_none=True)
        fwd(model, tokens, pos, images=images, image_mask=image_mask, text_image_mask=tim, labels=labels).mean().backward()
        return _grads(model)

    g0 = step()
    gates = {k: v for k, v in g0.items() if k.endswith("_gate")}
    branch = {k: v for k, v in g0.items() if not k.endswith("_gate")}
    assert len(gates) == 4 and all(v > 0 for v in gates.values()), gates
    assert all(v == 0 for v in branch.values()), branch  # tanh(0) = 0 blocks the branches
    vision_grad = max(p.grad.abs().max().item() for p in model.vision_model.parameters())
    assert vision_grad == 0
    opt.step()
    g1 = step()
    for suffix in ("linear_q.weight", "linear_kv.weight", "linear_proj.weight", "q_layernorm.weight",
                   "k_layernorm.weight", "mlp.linear_fc1.weight", "mlp.linear_fc2.weight",
                   "input_layernorm.weight", "pre_mlp_layernorm.weight"):
        for layer in (1, 4):
            name = next(k for k in g1 if k.startswith(f"{layer}.") and k.endswith(suffix))
            assert g1[name] > 0, name
    assert max(p.grad.abs().max().item() for p in model.vision_model.parameters()) > 0


# ------------------------------------------------------------------------------------------------
# Masks and bad input
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gated_model():
    cfg = ca_config(num_layers=6, layers=(1, 4))
    model = build(cfg, seed=4)
    set_gates(model)
    return cfg, model


def test_text_before_image_gets_no_contribution(gated_model):
    cfg, model = gated_model
    tokens, pos, feats, tim, image_mask = inputs(cfg)
    with torch.no_grad():
        text_only = fwd(model, tokens, pos)
        out = fwd(model, tokens, pos, image_mask=image_mask, text_image_mask=tim, cross_attention_states=feats)
    # sample 0 sees its first image at position 3: rows 0-2 are the text-only rows
    assert torch.allclose(out[0, :3], text_only[0, :3], rtol=0, atol=1e-6)
    assert (out[0, 3:] - text_only[0, 3:]).abs().max() > 1e-3
    assert (out[1] - text_only[1]).abs().max() > 1e-3


def test_batch_without_image(gated_model):
    cfg, model = gated_model
    tokens, pos, feats, tim, _ = inputs(cfg)
    with torch.no_grad():
        text_only = fwd(model, tokens, pos)  # no features at all: CA layers skipped (HF semantics)
        all_padded = fwd(model, tokens, pos, image_mask=torch.zeros(2, 2, dtype=torch.bool), text_image_mask=tim,
                           cross_attention_states=feats)
        never_allowed = fwd(model, tokens, pos, text_image_mask=torch.zeros_like(tim), cross_attention_states=feats)
    assert torch.isfinite(text_only).all()
    assert torch.equal(all_padded, text_only)  # every row sees no image: the CA layers add exactly 0
    assert torch.equal(never_allowed, text_only)


def test_padded_image_is_ignored(gated_model):
    cfg, model = gated_model
    tokens, pos, feats, tim, image_mask = inputs(cfg)
    k = cfg.model.num_image_tokens
    changed = feats.clone()
    changed[1, k:] = 100.0  # sample 1's image 1 is padded
    with torch.no_grad():
        a = fwd(model, tokens, pos, image_mask=image_mask, text_image_mask=tim, cross_attention_states=feats)
        b = fwd(model, tokens, pos, image_mask=image_mask, text_image_mask=tim, cross_attention_states=changed)
    assert torch.equal(a, b)


def test_no_text_image_mask_means_all_present_images(gated_model):
    cfg, model = gated_model
    tokens, pos, feats, _, image_mask = inputs(cfg)
    full = torch.ones(2, cfg.model.language.seq_length, 2, dtype=torch.bool)
    with torch.no_grad():
        a = fwd(model, tokens, pos, image_mask=image_mask, cross_attention_states=feats)
        b = fwd(model, tokens, pos, image_mask=image_mask, text_image_mask=full, cross_attention_states=feats)
        c = fwd(model, tokens, pos, cross_attention_states=feats.reshape(2, 2, -1, feats.shape[-1]))
    assert torch.equal(a, b)
    assert torch.isfinite(c).all()


def test_bad_input_raises(gated_model):
    cfg, model = gated_model
    tokens, pos, feats, tim, image_mask = inputs(cfg)
    v = cfg.model.vision_encoder
    with pytest.raises(ValueError, match="language hidden size 64"):
        fwd(model, tokens, pos, cross_attention_states=torch.randn(2, 8, 32))
    with pytest.raises(ValueError, match="text_image_mask shape"):
        fwd(model, tokens, pos, text_image_mask=tim[:, :5], cross_attention_states=feats)
    with pytest.raises(ValueError, match="image_mask shape"):
        fwd(model, tokens, pos, image_mask=image_mask[:, :1], text_image_mask=tim, cross_attention_states=feats)
    with pytest.raises(ValueError, match="either images or cross_attention_states"):
        fwd(model, tokens, pos, images=torch.randn(2, 2, 3, v.image_size, v.image_size), cross_attention_states=feats)
    with pytest.raises(ValueError, match="do not split"):
        fwd(model, tokens, pos, image_mask=torch.ones(2, 3, dtype=torch.bool), cross_attention_states=feats)


# ------------------------------------------------------------------------------------------------
# Generation cache
# ------------------------------------------------------------------------------------------------

def test_decode_with_cached_image_kv_matches_full_forward(gated_model):
    from megatron.core.inference.contexts import StaticInferenceContext

    cfg, model = gated_model
    tokens, pos, feats, tim, image_mask = inputs(cfg)
    s = tokens.shape[1]
    with torch.no_grad():
        full = fwd(model, tokens, pos, image_mask=image_mask, text_image_mask=tim, cross_attention_states=feats)
        ctx = StaticInferenceContext(max_batch_size=2, max_sequence_length=s)
        prefill = fwd(model, tokens[:, :s - 2], pos[:, :s - 2], image_mask=image_mask, text_image_mask=tim[:, :s - 2],
                        cross_attention_states=feats, inference_context=ctx)
        cache = ctx.cross_attention_cache
        assert sorted(cache.kv) == [2, 5]  # layer numbers (1-based) of the two CA layers
        cached = {n: kv[0].clone() for n, kv in cache.kv.items()}
        steps = []
        for t in (s - 2, s - 1):  # decode without image features: K/V come from the cache
            ctx.sequence_len_offset = t
            steps.append(fwd(model, tokens[:, t:t + 1], pos[:, t:t + 1], image_mask=image_mask,
                               text_image_mask=tim[:, t:t + 1], inference_context=ctx))
    assert all(torch.equal(cache.kv[n][0], v) for n, v in cached.items())  # computed once, reused
    assert torch.allclose(prefill[:, -1], full[:, s - 3], rtol=0, atol=1e-5)
    for i, t in enumerate((s - 2, s - 1)):
        assert torch.allclose(steps[i][:, -1], full[:, t], rtol=0, atol=1e-5), (t, (steps[i][:, -1] - full[:, t]).abs().max())
    # without text_image_mask the decode step reuses the last prefill row (HF generate's rule)
    with torch.no_grad():
        ctx.sequence_len_offset = s - 2
        again = fwd(model, tokens[:, s - 2:s - 1], pos[:, s - 2:s - 1], inference_context=ctx)
    assert torch.allclose(again[:, -1], steps[0][:, -1], rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# Checkpoint round trip (dist_checkpointing, in a spawned world of 1)
# ------------------------------------------------------------------------------------------------

def _save_load_gates(cfg, directory):
    import os

    from megatron.core import dist_checkpointing

    runtime.initialize(seed=1)
    model = build_model(cfg)
    set_gates(model, 0.3, -0.2)
    with torch.no_grad():
        for layer in model.cross_attention_layers():
            layer.cross_attention.q_layernorm.weight.fill_(1.5)
    os.makedirs(directory, exist_ok=True)
    dist_checkpointing.save(model.sharded_state_dict(), directory)  # no metadata: the model forces non-homogeneous
    fresh = build_model(cfg)
    state = dist_checkpointing.load(fresh.sharded_state_dict(), directory)
    fresh.load_state_dict(state, strict=False)
    return {n: p.detach().clone() for n, p in fresh.named_parameters() if "_gate" in n or "q_layernorm" in n}


def test_checkpoint_round_trip_keeps_gates(tmp_path):
    cfg = ca_config(num_layers=6, layers=(1, 4))
    (params,) = run_distributed(_save_load_gates, 1, cfg, str(tmp_path / "ckpt"))
    gates = {n: v.item() for n, v in params.items() if "_gate" in n}
    assert len(gates) == 4
    assert gates["language_model.decoder.layers.1.cross_attn_attn_gate"] == pytest.approx(0.3)
    assert gates["language_model.decoder.layers.4.cross_attn_mlp_gate"] == pytest.approx(-0.3)
    assert all(torch.all(v == 1.5) for n, v in params.items() if "q_layernorm" in n)
