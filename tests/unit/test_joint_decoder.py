"""joint_decoder on one rank: forward/backward, image features really reach the text positions,
freeze options, clear errors (image-token count, backend 'te' without Transformer Engine).

The model needs megatron's global parallel state, so the model checks run in one spawned world of
one rank (``run_distributed``) and return plain numbers; the assertions are made here.
"""

from __future__ import annotations

import copy

import pytest
import torch

from megatron_vlm.config import Config
from megatron_vlm.testing.configs import small_config
from megatron_vlm.testing.distributed import run_distributed

B = 2


def _grads(model, prefix: str) -> dict:
    """Per parameter of a submodule: (requires_grad, has grad, grad abs sum)."""
    out = {}
    for name, p in getattr(model, prefix).named_parameters():
        out[name] = (p.requires_grad, p.grad is not None,
                     0.0 if p.grad is None else p.grad.abs().sum().item())
    return out


def _error(fn) -> dict | None:
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - reported to the test
        return {"type": type(e).__name__, "message": str(e)}
    return None


def _joint_decoder_world(cfg: Config) -> dict:
    from megatron_vlm import runtime
    from megatron_vlm.data.batch import ModelInputs
    from megatron_vlm.models import build_model
    from megatron_vlm.models.backends import resolve_backend
    from megatron_vlm.testing.batches import random_batch

    runtime.initialize(seed=5)
    out = {"backend": resolve_backend("auto")}
    batch = random_batch(cfg.model, B, seed=3)
    k = cfg.model.num_image_tokens

    def run(model, images=None, tokens=None, image_mask=None, backward=False):
        loss = model(ModelInputs(batch.tokens if tokens is None else tokens, batch.position_ids,
                                 images=batch.images if images is None else images,
                                 image_mask=batch.image_mask if image_mask is None else image_mask,
                                 labels=batch.labels))
        if backward:
            (loss * batch.loss_mask).sum().backward()
        return loss.detach()

    # forward + backward
    model = build_model(cfg)
    out["type"] = type(model).__name__
    loss = run(model, backward=True)
    out["loss"] = loss
    out["grads"] = {m: _grads(model, m) for m in ("vision_model", "vision_projection", "language_model")}
    model.zero_grad(set_to_none=True)

    # image features reach the text: change sample 0's image only
    with torch.no_grad():
        other = batch.images.clone()
        other[0] = torch.randn(other[0].shape, generator=torch.Generator().manual_seed(99))
        out["loss_other_image"] = run(model, images=other)
        # a padded image slot (image_mask False) and no image tokens: its pixels are ignored
        tokens = batch.tokens.clone()
        tokens[1, 1:1 + k] = 7
        mask = batch.image_mask.clone()
        mask[1, 0] = False
        noisy = batch.images.clone()
        noisy[1] = noisy[1] + 5.0
        out["masked_losses"] = (run(model, tokens=tokens, image_mask=mask),
                                run(model, tokens=tokens, image_mask=mask, images=noisy))
        # the number of image tokens must match the present images
        short = batch.tokens.clone()
        short[0, 1] = 7
        out["short_error"] = _error(lambda: run(model, tokens=short))
        out["absent_error"] = _error(lambda: run(model, image_mask=mask))

    # freeze options
    for option in ("freeze_vision", "freeze_language", "freeze_vision+freeze_language"):
        fcfg = copy.deepcopy(cfg)
        for name in option.split("+"):
            setattr(fcfg.model, name, True)
        frozen = build_model(fcfg)
        run(frozen, backward=True)
        out[option] = {m: _grads(frozen, m) for m in ("vision_model", "vision_projection", "language_model")}

    # backend 'te' without Transformer Engine / CUDA
    tcfg = copy.deepcopy(cfg)
    tcfg.model.backend = "te"
    out["te_error"] = _error(lambda: build_model(tcfg))
    return out


@pytest.fixture(scope="module")
def world():
    cfg = small_config()
    (out,) = run_distributed(_joint_decoder_world, 1, cfg, timeout=300)
    return cfg, out


def _trainable_and_nonzero(grads: dict) -> bool:
    return bool(grads) and all(rg and has for rg, has, _ in grads.values()) and sum(
        s > 0 for _, _, s in grads.values()) >= 0.9 * len(grads)


def _frozen(grads: dict) -> bool:
    return bool(grads) and all(not rg and not has for rg, has, _ in grads.values())


def test_forward_backward_loss_shape_and_grads(world):
    cfg, out = world
    assert out["type"] == "JointDecoderVLM"
    loss = out["loss"]
    assert loss.shape == (B, cfg.model.language.seq_length) and torch.isfinite(loss).all()
    # random init: the per-token loss is close to log(vocab)
    assert abs(loss.mean().item() - torch.log(torch.tensor(256.0)).item()) < 1.5
    for module, grads in out["grads"].items():
        assert _trainable_and_nonzero(grads), (module, grads)


def test_image_features_change_the_text_loss(world):
    cfg, out = world
    k = cfg.model.num_image_tokens
    a, b = out["loss"], out["loss_other_image"]
    assert torch.equal(a[:, 0], b[:, 0])  # causal: the token before the image cannot see it
    diff = (a[0, 1 + k:] - b[0, 1 + k:]).abs()
    assert (diff > 1e-6).all(), diff  # every text position after sample 0's image sees it
    assert torch.allclose(a[1], b[1], atol=1e-6)  # sample 1's image did not change


def test_absent_image_is_ignored(world):
    _, out = world
    clean, noisy = out["masked_losses"]
    assert torch.isfinite(clean).all()
    assert torch.allclose(clean[1], noisy[1], atol=1e-6)  # masked-out pixels have no influence
    assert torch.allclose(clean[0], out["loss"][0], atol=1e-6)


def test_image_token_count_mismatch_is_a_clear_error(world):
    cfg, out = world
    k = cfg.model.num_image_tokens
    err = out["short_error"]
    assert err is not None and err["type"] == "ValueError", err
    assert err["message"] == (f"image-token count per sample [{k - 1}, {k}] does not match "
                              f"{k} tokens x present images = [{k}, {k}]")
    err = out["absent_error"]  # image tokens for an image marked absent
    assert err is not None and err["type"] == "ValueError"
    assert f"= [{k}, 0]" in err["message"], err


def test_freeze_vision(world):
    _, out = world
    grads = out["freeze_vision"]
    assert _frozen(grads["vision_model"]), grads["vision_model"]
    assert _trainable_and_nonzero(grads["language_model"])


def test_llava_stage1_freeze_trains_only_the_projector(world):
    _, out = world
    grads = out["freeze_vision+freeze_language"]
    assert _frozen(grads["vision_model"]) and _frozen(grads["language_model"])
    assert _trainable_and_nonzero(grads["vision_projection"]), grads["vision_projection"]


def test_freeze_language(world):
    _, out = world
    grads = out["freeze_language"]
    assert _frozen(grads["language_model"]), grads["language_model"]
    # gradients still flow through the frozen decoder into the vision side
    assert _trainable_and_nonzero(grads["vision_model"]), grads["vision_model"]
    assert _trainable_and_nonzero(grads["vision_projection"])


def test_te_backend_without_transformer_engine_is_a_clear_error(world):
    _, out = world
    assert out["backend"] == "local"
    err = out["te_error"]
    assert err is not None and err["type"] == "ValueError", err
    assert "backend='te' needs Transformer Engine and a CUDA device" in err["message"]


def test_resolve_backend():
    from megatron_vlm.models import backends as specs

    assert specs.resolve_backend("auto") == "local"  # no CUDA here
    assert specs.resolve_backend("local") == "local"
    with pytest.raises(ValueError, match="backend='te' needs Transformer Engine"):
        specs.resolve_backend("te")
    with pytest.raises(ValueError, match=r"backend='cuda': allowed 'auto', 'local', 'te'"):
        specs.resolve_backend("cuda")


def test_splice_puts_features_at_image_tokens_in_order():
    from megatron_vlm.archs.joint_decoder.model import splice_image_embeddings

    s, b, n, k, h, img = 10, 2, 2, 2, 3, 9
    tokens = torch.tensor([[1, img, img, 2, img, img, 3, 4, 5, 6],
                           [1, 2, img, img, 3, 4, 5, 6, 7, 8]])
    mask = torch.tensor([[True, True], [True, False]])  # sample 1's second slot is padding
    text = torch.randn(s, b, h)
    feats = torch.randn(b, n, k, h)
    out = splice_image_embeddings(text, tokens, feats, mask, img, sequence_parallel=False)
    expected = text.clone()
    expected[1:3, 0], expected[4:6, 0] = feats[0, 0], feats[0, 1]
    expected[2:4, 1] = feats[1, 0]
    assert torch.equal(out, expected)
