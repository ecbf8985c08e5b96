"""Several vision encoders fused (``model.fusion``, ``megatron_vlm/models/fusion.py``), one rank:

* cross_attn at init equals the generalist-only model bit for bit (both fusion spaces, and the
  cross_attention arch); the gate gets a gradient at once, every fusion weight after one step;
* weighted_average with one-hot data weights equals the model with that encoder alone; data
  weights are normalised once; all-zero specialist weights give the generalist;
* sequence_append: token count and positions for 1, 2 and 3 encoders;
* router: top_k, data weights with zero entries; metrics; FLOPs; bad inputs one line each.
"""

from __future__ import annotations

import copy

import pytest
import torch

from megatron_vlm import runtime
from megatron_vlm.config import Config, ConfigError, VisionConfig, validate
from megatron_vlm.data.batch import ModelInputs
from megatron_vlm.data.layout import TokenLayout
from megatron_vlm.models import build_model
from megatron_vlm.models import fusion as F

IMAGE_TOKEN = 255
ENC = dict(num_layers=1, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64, image_size=16)


def encoders(n: int = 3, twin_width: int = 48) -> list[VisionConfig]:
    """gen (4x4 grid, generalist), twin (4x4 grid, another width), fine (8x8 grid)."""
    out = [VisionConfig(name="gen", generalist=True, patch_size=4, **ENC),
           VisionConfig(name="twin", patch_size=4, **dict(ENC, hidden_size=twin_width)),
           VisionConfig(name="fine", patch_size=2, **ENC)]
    return out[:n]


def config(method="cross_attn", n=3, space="projected", router="learned", arch="joint_decoder", **fusion) -> Config:
    cfg = Config()
    m = cfg.model
    m.arch = arch
    lang = m.language
    lang.num_layers, lang.hidden_size, lang.num_attention_heads, lang.num_query_groups = 2, 64, 4, 2
    lang.ffn_hidden_size, lang.vocab_size, lang.seq_length = 96, 256, 112
    m.image_token_id = IMAGE_TOKEN
    m.vision = encoders(n, twin_width=32 if space == "vision" else 48)
    m.fusion.method, m.fusion.space, m.fusion.router = method, space, router
    for k, v in fusion.items():
        setattr(m.fusion, k, v)
    if arch == "cross_attention":
        lang.num_layers, m.cross_attention.every, lang.seq_length = 3, None, 24
        m.cross_attention.layers = [1]
    return validate(cfg)


def batch(cfg: Config, b: int = 2, seed: int = 0, weights=None) -> ModelInputs:
    """[bos, image positions (inline layout) or one marker, text] + one image per sample for each
    encoder (at its size), labels; ``weights``: the per-sample router_weights."""
    g = torch.Generator().manual_seed(seed)
    m, s = cfg.model, cfg.model.language.seq_length
    tokens = torch.randint(0, 200, (b, s), generator=g)
    k = m.num_image_tokens if m.arch != "cross_attention" else 1
    tokens[:, 1:1 + k] = IMAGE_TOKEN
    images = tuple(torch.randn(b, 1, 3, v.image_size, v.image_size, generator=g) for v in m.vision)
    rw = None if weights is None else torch.tensor(weights, dtype=torch.float32)
    return ModelInputs(tokens, images=images if len(images) > 1 else images[0],
                       labels=torch.roll(tokens, -1, dims=1), router_weights=rw)


def logits(model, inputs: ModelInputs, **change) -> torch.Tensor:
    inputs = copy.copy(inputs)
    inputs.labels = None
    for k, v in change.items():
        setattr(inputs, k, v)
    with torch.no_grad():
        return model(inputs)


def alone(cfg: Config, multi, name: str):
    """The one-encoder model of encoder ``name``: its encoder, its projector (or the shared one)
    and the language model copied from the multi-encoder ``multi``."""
    one = copy.deepcopy(cfg)
    v = copy.deepcopy(next(v for v in cfg.model.vision if v.name == name))
    v.generalist = False
    one.model.vision = [v]
    model = build_model(one).eval()
    model.vision_model.load_state_dict(multi.vision_models[name].state_dict())
    projection = multi.vision_projection if multi.vision_projections is None else multi.vision_projections[name]
    model.vision_projection.load_state_dict(projection.state_dict())
    model.language_model.load_state_dict(multi.language_model.state_dict())
    return model


pytestmark = pytest.mark.usefixtures("single_rank")


def build(cfg: Config, seed: int = 0):
    runtime.set_seed(seed)
    return build_model(cfg).eval()


# ------------------------------------------------------------------------------------------------
# cross_attn
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("space", ["projected", "vision"])
def test_cross_attn_at_init_is_the_generalist_alone_bit_for_bit(space):
    cfg = config("cross_attn", space=space)
    model = build(cfg, seed=1)
    inputs = batch(cfg)
    ref = logits(alone(cfg, model, "gen"), inputs, images=inputs.images[0])
    assert torch.equal(logits(model, inputs), ref)
    with torch.no_grad():
        model.fusion.gate.fill_(0.5)  # control: an open gate lets the specialists in
    assert (logits(model, inputs) - ref).abs().max() > 1e-4


def test_cross_attn_gate_then_fusion_weights_get_gradients():
    cfg = config("cross_attn")
    model = build(cfg, seed=2).train()
    inputs = batch(cfg, seed=1)
    fusion = dict(model.fusion.named_parameters())
    assert set(fusion) == {"gate", "router.mlp.0.weight", "router.mlp.0.bias", "router.mlp.2.weight",
                           "router.mlp.2.bias", "attention.linear_q.weight", "attention.linear_q.bias",
                           "attention.linear_kv.weight", "attention.linear_kv.bias",
                           "attention.linear_proj.weight", "attention.linear_proj.bias"}
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model(inputs).sum().backward()
    assert fusion["gate"].grad.abs().item() > 0
    # tanh(0) = 0: nothing behind the gate has a gradient yet (Mllama's zero gate)
    assert all(p.grad is None or p.grad.abs().sum() == 0 for n, p in fusion.items() if n != "gate")
    optimizer.step()
    optimizer.zero_grad()
    model(inputs).sum().backward()
    zero = [n for n, p in fusion.items() if p.grad is None or p.grad.abs().sum() == 0]
    assert zero == [], zero


def test_cross_attn_zero_specialist_weights_give_the_generalist_even_with_an_open_gate():
    cfg = config("cross_attn", router="data")
    model = build(cfg, seed=3)
    with torch.no_grad():
        model.fusion.gate.fill_(0.8)
    inputs = batch(cfg, weights=[[1.0, 0.0, 0.0], [0.0, 0.0, 3.0]])
    out = logits(model, inputs)
    ref = logits(alone(cfg, model, "gen"), inputs, images=inputs.images[0])
    assert torch.isfinite(out).all()
    assert torch.equal(out[0], ref[0])  # sample 0: every specialist weight 0
    assert (out[1] - ref[1]).abs().max() > 1e-4  # sample 1: 'fine' attended


def test_cross_attention_arch_with_two_encoders():
    cfg = config("cross_attn", n=2, arch="cross_attention")
    model = build(cfg, seed=4)
    assert type(model).__name__ == "CrossAttentionVLM"
    inputs = batch(cfg)
    out = logits(model, inputs)
    assert out.shape == (2, 24, 256) and torch.isfinite(out).all()
    assert torch.equal(out, logits(alone(cfg, model, "gen"), inputs, images=inputs.images[0]))
    with torch.no_grad():
        model.fusion.gate.fill_(0.5)
        for layer in model.cross_attention_layers():
            layer.cross_attn_attn_gate.fill_(0.7)
    opened = logits(model, inputs)
    other = torch.randn(inputs.images[1].shape, generator=torch.Generator().manual_seed(9))
    changed = logits(model, inputs, images=(inputs.images[0], other))
    # the specialist reaches the text (same inputs otherwise: any difference is the specialist's)
    assert (opened - changed).abs().max() > 1e-6


@pytest.mark.parametrize("arch", ["moma", "mot", "mmca"])
def test_other_archs_with_two_encoders(arch):
    """Spliced archs: cross_attn at init is the generalist alone, bit for bit."""
    cfg = config("cross_attn", n=2)
    cfg.model.arch = arch
    model = build(validate(cfg), seed=10)
    inputs = batch(cfg)
    out = logits(model, inputs)
    assert torch.isfinite(out).all()
    assert torch.equal(out, logits(alone(cfg, model, "gen"), inputs, images=inputs.images[0]))


# ------------------------------------------------------------------------------------------------
# weighted_average
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["gen", "twin"])
def test_weighted_average_one_hot_equals_that_encoder_alone(name):
    cfg = config("weighted_average", router="data")
    model = build(cfg, seed=5)
    one_hot = [[float(v.name == name) for v in cfg.model.vision]] * 2
    inputs = batch(cfg, weights=one_hot)
    index = [v.name for v in cfg.model.vision].index(name)
    ref = logits(alone(cfg, model, name), inputs, images=inputs.images[index])
    assert torch.equal(logits(model, inputs), ref)
    mixed = logits(model, inputs, router_weights=torch.tensor([[1.0, 1.0, 1.0]] * 2))
    assert (mixed - ref).abs().max() > 1e-4  # control


def test_weighted_average_normalises_data_weights_once_and_pools_to_the_generalist_grid():
    cfg = config("weighted_average", router="data")
    model = build(cfg, seed=6)
    g = torch.Generator().manual_seed(0)
    tokens = [torch.randn(3, 16, 64, generator=g), torch.randn(3, 16, 64, generator=g),
              torch.randn(3, 64, 64, generator=g)]
    raw = torch.tensor([[2.0, 6.0, 0.0], [0.0, 0.0, 0.0], [1.0, 1.0, 2.0]])
    F.collect_metrics(cfg)  # reset
    out = model.fusion(tokens, raw)
    fine = tokens[2].reshape(3, 8, 8, 64)  # row-major 8x8 grid -> 4x4 by 2x2 means
    pooled = fine.reshape(3, 4, 2, 4, 2, 64).mean(dim=(2, 4)).reshape(3, 16, 64)
    assert torch.allclose(out[0], 0.25 * tokens[0][0] + 0.75 * tokens[1][0], atol=1e-6)
    assert torch.equal(out[1], tokens[0][1])  # all zero: the generalist
    assert torch.allclose(out[2], 0.25 * tokens[0][2] + 0.25 * tokens[1][2] + 0.5 * pooled[2], atol=1e-6)
    metrics = F.collect_metrics(cfg)
    assert metrics == pytest.approx({"router_weight_gen": (0.25 + 1 + 0.25) / 3,
                                     "router_weight_twin": (0.75 + 0 + 0.25) / 3,
                                     "router_weight_fine": 0.5 / 3})
    assert F.collect_metrics(cfg) == {}  # reset after collecting


# ------------------------------------------------------------------------------------------------
# sequence_append
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 2, 3])
def test_sequence_append_token_count_and_positions(n):
    from megatron_vlm.archs.joint_decoder.model import splice_image_embeddings

    cfg = config("sequence_append", n=n)
    model = build(cfg, seed=7)
    sizes = [cfg.model.encoder_image_tokens(v) for v in cfg.model.vision]  # 16, 16, 64
    assert cfg.model.num_image_tokens == sum(sizes)
    assert TokenLayout.INLINE.positions_per_image(cfg.model) == sum(sizes)  # what the data layer reserves
    inputs = batch(cfg)
    with torch.no_grad():
        feats = model.encode_images(inputs.images)  # [b, 1, k, h]
        assert feats.shape == (2, 1, sum(sizes), 64)
        images = inputs.images if n > 1 else (inputs.images,)
        start = 0
        for v, x, k in zip(cfg.model.vision, images, sizes):
            own = model._encoder_features(model.vision_models[v.name] if n > 1 else model.vision_model, v, x)
            proj = model.vision_projections[v.name] if n > 1 else model.vision_projection
            assert torch.equal(feats[:, 0, start:start + k], model._project(proj, own)), v.name
            start += k
        text = model.language_model.embedding(input_ids=inputs.tokens, position_ids=inputs.position_ids)
        spliced = splice_image_embeddings(text, inputs.tokens, feats, None, IMAGE_TOKEN, False)
        assert torch.equal(spliced[1:1 + sum(sizes)].transpose(0, 1), feats[:, 0])  # positions 1..k
        assert torch.equal(spliced[1 + sum(sizes):], text[1 + sum(sizes):])
    assert torch.isfinite(logits(model, inputs)).all()
    keys = {k.split(".")[0] for k in model.state_dict()}
    assert keys == ({"vision_model", "vision_projection", "language_model"} if n == 1 else
                    {"vision_models", "vision_projections", "language_model"})  # no fusion weights
    assert (model.fusion is None) == (n == 1)


# ------------------------------------------------------------------------------------------------
# router
# ------------------------------------------------------------------------------------------------

def test_top_k_softmax_and_data_weights():
    logits_ = torch.tensor([[0.0, 3.0, 1.0, 2.0], [5.0, -1.0, 0.5, 0.0]])
    w = F.top_k_softmax(logits_, top_k=2, always=0)  # generalist (column 0) + the 2 best others
    assert torch.equal(w > 0, torch.tensor([[True, True, False, True], [True, False, True, True]]))
    assert torch.allclose(w.sum(-1), torch.ones(2))
    assert torch.allclose(w[0, [0, 1, 3]], torch.softmax(torch.tensor([0.0, 3.0, 2.0]), 0))  # ONE softmax
    w = F.top_k_softmax(logits_, top_k=1)
    assert torch.equal((w > 0).sum(-1), torch.tensor([1, 1])) and torch.equal(w.argmax(-1), torch.tensor([1, 0]))
    assert torch.equal(F.top_k_softmax(logits_, None), torch.softmax(logits_, -1))
    raw = torch.tensor([[0.0, 2.0, 6.0], [0.0, 0.0, 0.0]])
    assert torch.equal(F.data_weights(raw, None), torch.tensor([[0.0, 0.25, 0.75], [0.0, 0.0, 0.0]]))
    assert torch.equal(F.data_weights(raw, 0)[1], torch.tensor([1.0, 0.0, 0.0]))


@pytest.mark.parametrize("method", ["weighted_average", "cross_attn"])
def test_learned_router_top_k_keeps_k_specialists(method):
    cfg = config(method, top_k=1)
    model = build(cfg, seed=8)
    F.collect_metrics(cfg)
    logits(model, batch(cfg, b=4))
    w = F._sums  # summed weights of the 4 images, model.vision order
    metrics = F.collect_metrics(cfg)
    names = ["gen", "twin", "fine"] if method == "weighted_average" else ["twin", "fine"]
    assert sorted(metrics) == sorted(f"router_weight_{n}" for n in names)
    assert sum(metrics.values()) == pytest.approx(1.0)
    assert w is not None and (w[0] > 0) == (method == "weighted_average")
    g = model.fusion.router
    with torch.no_grad():
        weights = g(torch.randn(5, 16, 64), None)
    specialists = weights[:, 1:] if method == "weighted_average" else weights
    assert torch.equal((specialists > 0).sum(-1), torch.ones(5, dtype=torch.long))


# ------------------------------------------------------------------------------------------------
# FLOPs, freezing, bad inputs
# ------------------------------------------------------------------------------------------------

def test_flops_count_every_encoder_and_the_fusion():
    from megatron_vlm.training.flops import iteration_flops

    one = config("cross_attn", n=1)
    two, three = config("cross_attn", n=2), config("cross_attn", n=3)
    f1, f2, f3 = (iteration_flops(c, 8) for c in (one, two, three))
    assert f1 < f2 < f3
    frozen = copy.deepcopy(three)
    frozen.model.vision[2].freeze = True
    assert iteration_flops(frozen, 8) < f3
    # same decoder length: what differs is the fusion (none < weighted sum < cross-attention)
    sa, wa = iteration_flops(config("sequence_append"), 8), iteration_flops(config("weighted_average"), 8)
    assert sa < wa < f3


def test_per_encoder_freeze():
    cfg = config("weighted_average")
    cfg.model.vision[1].freeze = True
    model = build(cfg)
    trainable = {n: any(p.requires_grad for p in m.parameters()) for n, m in model.vision_models.items()}
    assert trainable == {"gen": True, "twin": False, "fine": True}
    cfg.model.freeze_vision, cfg.model.vision[0].freeze = True, False
    model = build(cfg)
    trainable = {n: any(p.requires_grad for p in m.parameters()) for n, m in model.vision_models.items()}
    assert trainable == {"gen": True, "twin": False, "fine": False}


def _config_error(edit) -> str:
    cfg = config("cross_attn")
    edit(cfg.model)
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    assert "\n" not in str(e.value)
    return str(e.value)


BAD = {
    "no generalist": (lambda m: setattr(m.vision[0], "generalist", False),
                      "model.vision: no encoder is marked generalist; mark exactly one (generalist: true)"),
    "two generalists": (lambda m: setattr(m.vision[2], "generalist", True),
                        "model.vision: 2 encoders marked generalist ['gen', 'fine']; mark exactly one"),
    "name": (lambda m: setattr(m.vision[1], "name", "twin.1"), "model.vision.1.name='twin.1': with several"),
    "same names": (lambda m: setattr(m.vision[1], "name", "gen"), "model.vision names ['gen', 'gen', 'fine']: must be distinct"),
    "method": (lambda m: setattr(m.fusion, "method", "concat"), "model.fusion.method='concat': allowed"),
    "router": (lambda m: setattr(m.fusion, "router", "gating"), "model.fusion.router='gating': allowed"),
    "space": (lambda m: setattr(m.fusion, "space", "text"), "model.fusion.space='text': allowed"),
    "top_k": (lambda m: setattr(m.fusion, "top_k", 3), "model.fusion.top_k=3: must be an integer in [1, 2]"),
    "top_k data": (lambda m: (setattr(m.fusion, "top_k", 1), setattr(m.fusion, "router", "data")),
                   "model.fusion.top_k=1: only for the learned router"),
    "heads": (lambda m: setattr(m.fusion, "heads", 5), "model.fusion.heads=5: must divide the fusion width 64"),
    "widths": (lambda m: setattr(m.fusion, "space", "vision"),
               "model.vision: encoders whose widths cannot be fused with model.fusion.space=vision: "
               "gen (32), twin (48), fine (32); give them one hidden_size, or use space: projected"),
    "tiles": (lambda m: setattr(m.vision[2], "max_tiles", 4),
              "model.vision.2 (fine): a tiled / Mllama vision tower cannot be fused"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_config_one_line(case):
    edit, message = BAD[case]
    assert _config_error(edit).startswith(message)


def test_heads_vs_tensor_parallel_size():
    cfg = config("cross_attn", heads=2)
    cfg.parallel.tensor_model_parallel_size = 4
    for v in cfg.model.vision:
        v.num_attention_heads = 4
    with pytest.raises(ConfigError, match=r"^model.fusion.heads=2: must be divisible by parallel.tensor_model_parallel_size=4"):
        validate(cfg)


def test_bad_model_inputs_one_line():
    cfg = config("weighted_average", router="data")
    model = build(cfg)
    inputs = batch(cfg, weights=[[1.0, 0.0, 0.0]] * 2)
    cases = {"images: a Tensor; model.vision has 3 encoders": dict(images=inputs.images[0]),
             "images: a tuple of 2; model.vision has 3 encoders": dict(images=inputs.images[:2]),
             "model.fusion.router='data': the batch has no router_weights": dict(router_weights=None),
             "router_weights of shape (2, 2): expected [2 images, 3 encoders]":
                 dict(router_weights=torch.ones(2, 2))}
    for message, change in cases.items():
        with pytest.raises(ValueError) as e:
            logits(model, inputs, **change)
        assert str(e.value).startswith(message) and "\n" not in str(e.value), str(e.value)
