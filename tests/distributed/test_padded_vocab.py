"""Padded vocabulary ids take no part in the softmax (``megatron_vlm.models.vocab``).

Tiny LLaVA (vocab 300) and Mllama (vocab 256, embedding 264 rows) imported from HF get 384 rows
(``--make-vocab-size-divisible-by`` 128): 84 / 128 padded output rows, zero after the import. Our
step-0 loss (megatron's schedule, forward only, the training loss function and reduction) on one
batch equals transformers' loss (``labels=``) on the same weights and batch, at TP=1 and at TP=2
(each rank holds half the vocab: the padded ids are all on rank 1's shard). Without the mask the
padded logits (0) enter the cross entropy and the losses differ by ~1e-2 relative. The logits our
model returns hold the lowest finite value at every padded id, so generation never picks one.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from megatron_vlm.conversion import tiny
from megatron_vlm.testing.distributed import run_distributed

RTOL = 1e-5


def _batch(model, family, cfg, seed: int):
    """One micro batch of 2 samples from the family's verify inputs: labels = next token, loss on
    every position whose target is a text token; the same labels in HF's form (-100 = no loss)."""
    import torch

    from megatron_vlm.data.batch import VLMBatch

    samples = [family.sample_inputs(cfg.model, seed=seed + i, text_len=20) for i in range(2)]
    cat = lambda name: torch.cat([getattr(s, name) for s in samples])  # noqa: E731
    tokens = cat("tokens")
    image_token = model.image_token_id
    labels = torch.zeros_like(tokens)
    labels[:, :-1] = tokens[:, 1:]
    loss_mask = torch.zeros_like(tokens, dtype=torch.float)
    loss_mask[:, :-1] = (tokens[:, 1:] != image_token).float()
    text_image_mask = samples[0].text_image_mask
    inputs = samples[0].__class__(tokens=tokens, images=cat("images"), image_mask=cat("image_mask"),
                                  text_image_mask=None if text_image_mask is None else cat("text_image_mask"))
    batch = VLMBatch(tokens=tokens, labels=labels, loss_mask=loss_mask, position_ids=inputs.position_ids,
                     modality_ids=model.modality_ids(inputs), images=inputs.images,
                     image_mask=inputs.image_mask, text_image_mask=inputs.text_image_mask)
    hf_labels = torch.where(tokens == image_token, torch.full_like(tokens, -100), tokens)
    return batch, inputs, hf_labels


def _losses(pairs: list[tuple[str, str]], tp: int, do_import: bool) -> list[dict] | None:
    """Per (HF folder, checkpoint): our step-0 loss at TP=``tp`` and (rank 0) transformers' loss."""
    import torch

    from megatron_vlm.conversion.families import family_for_arch
    from megatron_vlm.conversion.verify import gather_logits, load_hf, load_megatron
    from megatron_vlm.training.step import forward_backward, reduce_losses

    out = []
    for hf, mcore in pairs:
        if do_import:
            from megatron_vlm.conversion.convert import import_hf

            import_hf(hf, mcore)
        cfg, model = load_megatron(mcore, tp)
        lang = cfg.model.language
        family = family_for_arch(cfg.model.arch)
        batch, inputs, hf_labels = _batch(model, family, cfg, seed=5)
        with torch.no_grad():
            ours = reduce_losses(forward_backward([model], [batch], batch.tokens.shape[1], forward_only=True))
            logits = gather_logits(model(inputs))  # [b, s, padded vocab]
        padded = logits[..., lang.unpadded_vocab_size:]
        r = {"arch": cfg.model.arch, "ours": ours, "vocab": lang.vocab_size, "true_vocab": lang.unpadded_vocab_size,
             "padded_logits_min": bool((padded == torch.finfo(padded.dtype).min).all())}
        if torch.distributed.get_rank() == 0:
            hf_model = load_hf(family, hf, torch.float32)
            with torch.no_grad():
                r["hf"] = hf_model(**family._hf_kwargs(hf_model, inputs), labels=hf_labels).loss.item()
        out.append(r)
    return out if torch.distributed.get_rank() == 0 else None


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    root = tmp_path_factory.mktemp("padded_vocab")
    pairs = [(str(tiny.save_llava(root / "llava")), str(root / "llava_mcore")),
             (str(tiny.save_mllama(root / "mllama")), str(root / "mllama_mcore"))]
    (tp1,) = run_distributed(_losses, 1, pairs, 1, True, timeout=300)
    return pairs, tp1


def _check(results: list[dict], tp: int) -> None:
    for r in results:
        print(f"{r['arch']} TP={tp}: vocab {r['true_vocab']} padded to {r['vocab']}: our step-0 loss "
              f"{r['ours']:.6f}, transformers {r['hf']:.6f}")
        assert r["vocab"] > r["true_vocab"]  # the case under test: padded rows exist
        assert r["ours"] == pytest.approx(r["hf"], rel=RTOL)
        assert r["padded_logits_min"]


def test_loss_equals_transformers_tp1(imported):
    _check(imported[1], tp=1)


def test_loss_equals_transformers_tp2(imported):
    pairs, _ = imported
    results = run_distributed(_losses, 2, pairs, 2, False, timeout=300)
    _check(results[0], tp=2)
    assert Path(pairs[0][1], "latest").is_file()
