"""Generative evaluation of a checkpoint on a dataset split (``tools/evaluate.py``).

For every sample of ``<data_path>/<split>`` (the shards, in stored order, through the training
image pipeline and :class:`~megatron_vlm.data.samples.SequenceBuilder`):

* **generative exact match**: the model greedily continues the sample's prompt (image + question,
  laid out as in training) until eos or ``max_new_tokens``; correct when the decoded continuation
  (without eos, stripped) equals the target text (the answer). Reported per question type
  (the record's ``qtype``, e.g. the shapes task's colour / shape / count; captions: ``caption``)
  and overall;
* **teacher-forced** on the same samples, as training's evaluation does: the loss per target token
  (over the true vocabulary) and the accuracy "argmax equals the label at every target position".

With greedy decoding the two accuracies agree on a sample unless the decoded text matches through a
different tokenisation or a near-tie flips between the batched forward and the cached decode.

Data parallel: batches go round-robin over the data-parallel ranks; sums are gathered to all ranks.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import torch

from megatron_vlm.data.samples import text_parts
from megatron_vlm.inference.engine import SamplingParams, generate
from megatron_vlm.inference.prompts import PromptBuilder, PromptImages


def _qtype(record: dict) -> str:
    return record.get("qtype") or ("caption" if "text" in record and "question" not in record else "question")


def split_batches(data_path: str, split: str, image, batch_size: int, limit: int | None = None):
    """(records, :class:`PromptImages` of the batch: images ``[b, 3, S, S]``, one per encoder, or
    tiles with their grid) batches of the split's shards in stored order, each sample once."""
    from megatron_vlm.data.dali_pipeline import ReaderSpec, batch_images, image_pipeline, json_records
    from megatron_vlm.data.shards import list_shards

    shards = list_shards(Path(data_path) / split)
    total = sum(s.num_samples for s in shards)
    if limit is not None:
        total = min(total, limit)
    batch_size = max(1, min(batch_size, total))
    spec = ReaderSpec(paths=tuple(str(s.tar) for s in shards), index_paths=tuple(str(s.index) for s in shards),
                      shard_id=0, num_shards=1, shuffle=False, seed=0)
    pipe = image_pipeline(spec, image, batch_size, 1, None)
    done = 0
    while done < total:
        *outputs, meta = pipe.run()
        records, images = json_records(meta), PromptImages(*batch_images(outputs, image))
        keep = min(len(records), total - done)  # the last batch wraps around: drop the repeats
        done += keep
        yield records[:keep], images.select(0, keep)
    del pipe


def _teacher_forced(model, builder, records, images, vocab_size: int) -> tuple[float, float, list[bool]]:
    """(loss sum, target tokens, per-sample correct) of one batch."""
    batch = builder.collate(records, images.images, images.grid).to(next(model.parameters()).device)
    logits = model(batch.model_inputs(with_labels=False), runtime_gather_output=True)[..., :vocab_size].float()
    mask = batch.loss_mask > 0
    loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch.labels.clamp(max=vocab_size - 1),
                                             reduction="none")
    hit = (logits.argmax(-1) == batch.labels) | ~mask
    return float((loss * mask).sum()), float(mask.sum()), hit.all(dim=1).tolist()


@torch.no_grad()
def evaluate(model, ckpt, data_path: str, split: str = "val", batch_size: int = 16,
             max_new_tokens: int = 16, limit: int | None = None, log=None) -> dict:
    """Accuracy per question type and overall (generative and teacher-forced) and the loss."""
    from megatron.core import parallel_state

    prompts = PromptBuilder(ckpt.cfg.model, ckpt.tokenizer)
    builder, tok = prompts.builder, ckpt.tokenizer
    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    model.eval()
    counts = defaultdict(lambda: [0, 0, 0])  # qtype -> [samples, generative correct, teacher-forced correct]
    loss_sum = tokens = 0.0
    examples = []
    for i, (records, images) in enumerate(split_batches(data_path, split, prompts.image, batch_size, limit)):
        if i % dp_size != dp_rank:
            continue
        l, n, tf = _teacher_forced(model, builder, records, images, ckpt.vocab_size)
        loss_sum, tokens = loss_sum + l, tokens + n
        inputs = [prompts.build(text_parts(r).prompt, images.select(j, j + 1), r.get("encoder_weights"))
                  for j, r in enumerate(records)]
        outs = generate(model, inputs, max_new_tokens, vocab_size=ckpt.vocab_size, eos_id=tok.eos_id,
                        banned=ckpt.banned_ids, sampling=SamplingParams(),
                        max_sequence_length=ckpt.context_length)
        for r, out, tf_ok in zip(records, outs, tf):
            text = tok.decode([t for t in out if t != tok.eos_id]).strip()
            ok = text == text_parts(r).target.strip()
            c = counts[_qtype(r)]
            c[0], c[1], c[2] = c[0] + 1, c[1] + ok, c[2] + bool(tf_ok)
            if len(examples) < 5:
                examples.append({"prompt": text_parts(r).prompt, "answer": text_parts(r).target.strip(),
                                 "generated": text})
        if log is not None:
            log(f"evaluate: batch {i + 1} ({sum(c[0] for c in counts.values())} samples on this rank)")
    gathered = [None] * torch.distributed.get_world_size(parallel_state.get_data_parallel_group())
    torch.distributed.all_gather_object(gathered, (dict(counts), loss_sum, tokens, examples),
                                        group=parallel_state.get_data_parallel_group())
    total = defaultdict(lambda: [0, 0, 0])
    loss_sum = tokens = 0.0
    for part, l, n, _ in gathered:
        loss_sum, tokens = loss_sum + l, tokens + n
        for k, v in part.items():
            total[k] = [a + b for a, b in zip(total[k], v)]
    per_type = {k: {"samples": v[0], "accuracy": v[1] / v[0], "teacher_forced_accuracy": v[2] / v[0]}
                for k, v in sorted(total.items())}
    n = sum(v[0] for v in total.values())
    return {"split": split, "samples": n,
            "accuracy": sum(v[1] for v in total.values()) / max(n, 1),
            "teacher_forced_accuracy": sum(v[2] for v in total.values()) / max(n, 1),
            "loss": loss_sum / tokens if tokens else math.nan,
            "per_type": per_type, "examples": gathered[0][3]}
