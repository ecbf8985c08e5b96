"""mmca attention against an explicit two-mask reference written here (plain matmul + softmax per
branch, masks from python loops over the token layout), outputs and gradients (input, QKV and
projection weights), fp32, GQA (4 heads, 2 query groups), both ``combine`` modes, on layouts with
text before the first image, several images per sample (two of them back to back), and padding.
Empty branches contribute exactly 0; through the whole model a later token (text or a later image)
changes no earlier output.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from megatron_vlm.data.batch import IMAGE_MODALITY, TEXT_MODALITY, VLMBatch, modality_context
from megatron_vlm.testing.configs import small_config
from megatron_vlm.testing.distributed import run_distributed

K = 4  # image tokens per image (8 px images, 4 px patches)

# Per sample: "t" text token, "I" one image (K tokens), "p" padding. 32 positions each.
LAYOUTS = [
    "ttt" + "I" + "t" * 6 + "I" + "t" * 12 + "ppp",       # text before the first image, 2 images, padding
    "t" + "II" + "t" * 23,                                # two images back to back
    "t" * 11 + "I" + "t" * 13 + "pppp",                   # one image in the middle, padding
    "I" + "t" * 10 + "I" + "t" * 14,                      # image first (no bos)
]


def mmca_config(layers: int = 2):
    cfg = small_config(language_layers=layers)
    cfg.model.arch, cfg.model.backend = "mmca", "local"
    v = cfg.model.vision_encoder
    v.image_size, v.patch_size = 8, 4
    cfg.data.images_per_sample = 2
    assert cfg.model.num_image_tokens == K
    return cfg


def expand(layout: str) -> str:
    return layout.replace("I", "i" * K)


def layout_batch(cfg, layouts: list[str], seed: int) -> VLMBatch:
    """A ``VLMBatch`` with the given token layouts (random text, random images, right padding)."""
    g = torch.Generator().manual_seed(seed)
    lang, v = cfg.model.language, cfg.model.vision_encoder
    s, image_token = lang.seq_length, lang.vocab_size - 1
    n = cfg.data.images_per_sample
    b = len(layouts)
    tokens = torch.randint(0, image_token, (b, s), generator=g)
    modality = torch.full((b, s), TEXT_MODALITY)
    padding = torch.zeros(b, s, dtype=torch.bool)
    image_mask = torch.zeros(b, n, dtype=torch.bool)
    for r, layout in enumerate(layouts):
        full = expand(layout)
        assert len(full) == s, (layout, len(full))
        for i, c in enumerate(full):
            if c == "i":
                tokens[r, i], modality[r, i] = image_token, IMAGE_MODALITY
            elif c == "p":
                tokens[r, i], padding[r, i] = 0, True
        image_mask[r, :layout.count("I")] = True
    labels = torch.roll(tokens, -1, dims=1)
    loss_mask = ((modality == TEXT_MODALITY) & ~padding).float().roll(-1, dims=1)
    loss_mask[:, -1] = 0
    loss_mask[padding] = 0
    images = torch.randn(b, n, 3, v.image_size, v.image_size, generator=g)
    return VLMBatch(tokens=tokens, labels=labels, loss_mask=loss_mask,
                    position_ids=torch.arange(s).expand(b, s).clone(), modality_ids=modality,
                    images=images, image_mask=image_mask, padding_mask=padding)


# ---- the explicit reference ----------------------------------------------------------------------

def reference_key_sets(layout: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(image keys, text keys) ``[s, s]`` bool of one sample, by the rules, with plain loops."""
    full = expand(layout)
    s = len(full)
    image_of, current, count = [None] * s, 0, 0
    for j, c in enumerate(full):
        if c == "i":
            if j == 0 or full[j - 1] != "i" or count == K:
                current, count = current + 1, 0
            image_of[j], count = current, count + 1
    img, txt = torch.zeros(s, s, dtype=torch.bool), torch.zeros(s, s, dtype=torch.bool)
    for i in range(s):
        for j in range(s):
            if full[i] == "t":
                img[i, j] = full[j] == "i" and j < i
                txt[i, j] = full[j] == "t" and j <= i
            elif full[i] == "i":
                img[i, j] = full[j] == "i" and image_of[j] == image_of[i]
    return img, txt


def reference_attention(x, w_qkv, w_proj, layouts, heads, groups, combine):
    """x ``[s, b, h]``; megatron's fused QKV layout (per query group: its query heads, k, v)."""
    s, b, _ = x.shape
    d = w_proj.shape[1] // heads
    per_group = heads // groups
    qkv = (x @ w_qkv.t()).reshape(s, b, groups, (per_group + 2) * d)
    q = qkv[..., :per_group * d].reshape(s, b, heads, d)
    k, v = qkv[..., per_group * d:(per_group + 1) * d], qkv[..., (per_group + 1) * d:]
    outs = []
    for r, layout in enumerate(layouts):
        img, txt = reference_key_sets(layout)
        n_branches = img.any(-1).float() + txt.any(-1).float()
        heads_out = []
        for hd in range(heads):
            g = hd // per_group
            scores = q[:, r, hd] @ k[:, r, g].t() / math.sqrt(d)  # [s, s]
            total = torch.zeros(s, d)
            for keys in (img, txt):
                probs = torch.softmax(scores.masked_fill(~keys, float("-inf")), dim=-1)
                probs = torch.where(keys.any(-1, keepdim=True), probs, torch.zeros_like(probs))  # empty: 0
                if combine == "mean":
                    probs = probs / n_branches.clamp(min=1).unsqueeze(-1)
                total = total + probs @ v[:, r, g]
            heads_out.append(total)
        outs.append(torch.cat(heads_out, dim=-1))
    return torch.stack(outs, dim=1) @ w_proj.t()


def _contexts(cfg, layouts):
    batch = layout_batch(cfg, layouts, seed=0)
    return modality_context(batch.modality_ids, batch.padding_mask)


def _attention_vs_reference(combine: str, impl: str):
    from megatron.core.transformer.spec_utils import build_module

    from megatron_vlm import runtime
    from megatron_vlm.archs.mmca.layers import mmca_layer_spec
    from megatron_vlm.models.backends import provider
    from megatron_vlm.models.vlm import language_transformer_config

    cfg = mmca_config()
    runtime.initialize(seed=3)
    tc = language_transformer_config(cfg.model, cfg.parallel)
    spec = mmca_layer_spec(provider("local"), K, combine, impl).submodules.self_attention
    attn = build_module(spec, config=tc, layer_number=1)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in attn.parameters():
            p.normal_(0, 0.3)
    s, b, h = cfg.model.language.seq_length, len(LAYOUTS), tc.hidden_size
    x = torch.randn(s, b, h, requires_grad=True)
    ctx = _contexts(cfg, LAYOUTS)
    out, _ = attn(x, attention_mask=ctx)
    grad_out = torch.randn_like(out)
    (out * grad_out).sum().backward()
    got = [out.detach(), x.grad, attn.linear_qkv.weight.grad, attn.linear_proj.weight.grad]

    x_ref = x.detach().clone().requires_grad_(True)
    w_qkv = attn.linear_qkv.weight.detach().clone().requires_grad_(True)
    w_proj = attn.linear_proj.weight.detach().clone().requires_grad_(True)
    ref = reference_attention(x_ref, w_qkv, w_proj, LAYOUTS, tc.num_attention_heads, tc.num_query_groups, combine)
    (ref * grad_out).sum().backward()
    want = [ref.detach(), x_ref.grad, w_qkv.grad, w_proj.grad]
    names = ["output", "grad input", "grad linear_qkv", "grad linear_proj"]
    return {n: ((a - r).abs().max().item(), r.abs().max().item()) for n, a, r in zip(names, got, want)}


@pytest.mark.parametrize("impl", ["fast", "explicit"])
@pytest.mark.parametrize("combine", ["sum", "mean"])
def test_attention_matches_explicit_reference(combine, impl):
    (diffs,) = run_distributed(_attention_vs_reference, 1, combine, impl)
    print(combine, impl, diffs)
    for name, (diff, scale) in diffs.items():
        assert scale > 1e-3, (name, scale)
        assert diff <= 1e-5 * scale, (name, diff, scale)


def test_reference_masks_are_not_causal_attention():
    """The reference is a real control: its key sets differ from plain causal attention."""
    img, txt = reference_key_sets(LAYOUTS[0])
    causal = torch.ones(32, 32, dtype=torch.bool).tril()
    assert not torch.equal(img | txt, causal)
    assert (img & txt).sum() == 0
    full = expand(LAYOUTS[0])
    first_text, first_image = full.index("t"), full.index("i")
    assert first_text < first_image and not img[first_text].any() and txt[first_text].any()
    assert img[first_image].sum() == K and not txt[first_image].any()  # image query: its own image only


@pytest.mark.parametrize("impl", ["fast", "explicit"])
def test_empty_branch_contributes_exactly_zero(impl):
    """Text before the first image: its output does not move by one bit when every image key/value
    changes (the empty image branch adds exactly 0, no uniform weight on masked or future keys) and
    equals the text-only attention; image queries: unmoved by any text key/value; padding: exactly 0."""
    import torch.nn.functional as F
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_vlm.archs.mmca.attention import MMCAttention, mmca_masks

    cfg = mmca_config()
    ctx = _contexts(cfg, LAYOUTS)
    tc = TransformerConfig(num_layers=1, hidden_size=64, num_attention_heads=4, num_query_groups=2)
    core = MMCAttention(tc, 1, AttnMaskType.causal, num_image_tokens=K, impl=impl).eval()
    g = torch.Generator().manual_seed(1)
    s, b, d = 32, len(LAYOUTS), 16
    q = torch.randn(s, b, 4, d, generator=g)
    k, v = torch.randn(s, b, 2, d, generator=g), torch.randn(s, b, 2, d, generator=g)
    out = core(q, k, v, ctx).reshape(s, b, 4, d)
    image_pos = ctx[..., 0].t()[:, :, None, None]  # [s, b, 1, 1]
    text_pos = ctx[..., 1].t()[:, :, None, None]
    noise = lambda: 100 * torch.randn(s, b, 2, d, generator=g)  # noqa: E731
    moved = lambda where: core(q, torch.where(where, noise(), k), torch.where(where, noise(), v),  # noqa: E731
                               ctx).reshape(s, b, 4, d)
    moved_images, moved_text = moved(image_pos), moved(text_pos)

    full = [expand(layout) for layout in LAYOUTS]
    r = 0
    before_first_image = [i for i in range(full[r].index("i")) if full[r][i] == "t"]
    images = [i for i, c in enumerate(full[r]) if c == "i"]
    pads = [i for i, c in enumerate(full[r]) if c == "p"]
    later = [i for i in range(images[0] + K, s) if full[r][i] == "t"]
    assert before_first_image and pads and later
    assert torch.equal(moved_images[before_first_image, r], out[before_first_image, r])
    assert torch.equal(moved_text[images, r], out[images, r])
    assert torch.equal(out[pads, r], torch.zeros_like(out[pads, r]))
    assert not torch.allclose(moved_images[later, r], out[later, r])  # controls: the change is seen
    assert not torch.allclose(moved_text[later, r], out[later, r])

    masks = mmca_masks(ctx, K)
    assert not masks.image[r, before_first_image].any()
    qb, kb, vb = (t.permute(1, 2, 0, 3) for t in (q, k, v))
    text_keys = (masks.text | torch.eye(s, dtype=torch.bool)).unsqueeze(1)
    text_only = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=text_keys, enable_gqa=True).permute(2, 0, 1, 3)
    torch.testing.assert_close(out[before_first_image, r], text_only[before_first_image, r], rtol=1e-6, atol=1e-6)
    assert not torch.allclose(out[later, r], text_only[later, r])  # there both branches count


# ---- through the whole model ----------------------------------------------------------------------

CAUSAL_LAYOUTS = ["ttt" + "I" + "t" * 9 + "I" + "t" * 9 + "ppp", "t" + "I" + "t" * 10 + "I" + "t" * 13]


def _model_prefix_change():
    from megatron_vlm import runtime
    from megatron_vlm.models import build_model

    cfg = mmca_config(layers=2)
    runtime.initialize(seed=1)
    model = build_model(cfg)
    model.eval()
    batch = layout_batch(cfg, CAUSAL_LAYOUTS, seed=4)
    inputs = batch.model_inputs(with_labels=False)
    # cut: the last position before the second image of each sample
    cuts = [expand(layout).index("i", expand(layout).index("t", expand(layout).index("i"))) - 1
            for layout in CAUSAL_LAYOUTS]
    later_text, later_image = inputs.tokens.clone(), inputs.images.clone()
    g = torch.Generator().manual_seed(9)
    for r, cut in enumerate(cuts):
        text_after = (inputs.modality_ids[r] == TEXT_MODALITY) & (torch.arange(32) > cut)
        later_text[r, text_after] = torch.randint(0, 100, (int(text_after.sum()),), generator=g)
        later_image[r, 1] = torch.randn(later_image[r, 1].shape, generator=g)
    result = {}
    with torch.no_grad():
        a = model(inputs)
        for name, changed in (("text", dataclasses.replace(inputs, tokens=later_text)),
                              ("image", dataclasses.replace(inputs, images=later_image))):
            b = model(changed)
            before = max(float((a[r, :cut + 1] - b[r, :cut + 1]).abs().max()) for r, cut in enumerate(cuts))
            after = min(float((a[r, cut + 1:] - b[r, cut + 1:]).abs().max()) for r, cut in enumerate(cuts))
            result[name] = (before, after, a.abs().max().item())
    return result


def test_later_tokens_change_no_earlier_output():
    (result,) = run_distributed(_model_prefix_change, 1)
    print(result)
    for name, (before, after, scale) in result.items():
        assert scale > 0
        assert before <= 1e-6 * scale, (name, before)
        assert after > 1e-4 * scale, (name, after)  # the change is seen where it may be
