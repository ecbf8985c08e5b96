"""Decoding with our models: cached (megatron-core ``StaticInferenceContext``) and uncached.

A batch is a list of prompts, each a batch-1 :class:`~megatron_vlm.data.batch.ModelInputs`
(``tokens [1, L_i]`` plus its images / masks, see :mod:`megatron_vlm.inference.prompts`); lengths may
differ. Results are the new token ids per prompt (the eos included when it was generated).

Cached (``use_cache=True``, the default): every sample's sequence is its prompt followed by its
generated tokens, contiguous from position 0 (no padding anywhere). One prefill runs the first
``min(L_i)`` positions of every prompt (images included: their positions lie in the common prefix);
then each step runs one position of every sample through the KV cache: the next prompt token of a
sample still in its prompt, else its last generated token (megatron's static-batching scheme). So
each new token costs one step and a prompt one prefill. The per-step inputs come from the arch's
decode hook ``ArchSpec.extend_inputs`` applied to each prompt (positions, masks), cut to the step's
position. Attention K/V live in the context's ``key_value_memory_dict`` (megatron's layers, MoT's own
attention), image K/V of cross-attention layers in ``cross_attention_cache`` (computed once, at the
prefill), the key modalities of MMCA in ``mmca_key_context``.

Uncached (``use_cache=False``): the reference. Each sample alone (batch 1) recomputes its whole
sequence for every new token, the inputs growing through ``ArchSpec.extend_inputs``.

Token choice (:class:`SamplingParams`): logits are cut to the true vocabulary (megatron pads the
embedding rows; a padded id is never produced), ``banned`` ids (the image token of the inline layout)
get -inf; greedy takes the argmax (the first of equal maxima), otherwise temperature, top-k, top-p
(the smallest set of most likely tokens whose probability reaches p) and a draw from a per-sample
generator seeded with ``seed + row`` (the same draws cached and uncached, on any TP/DP layout).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

from megatron_vlm.data.batch import ModelInputs

# ModelInputs fields laid out [b, s, ...] (cut per position); the others are per sample
SEQUENCE_FIELDS = ("tokens", "position_ids", "modality_ids", "text_image_mask", "padding_mask", "labels")


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0   # 0 = greedy
    top_k: int = 0             # 0 = no limit
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if not self.temperature >= 0:
            raise ValueError(f"--temperature {self.temperature}: must be >= 0 (0 = greedy)")
        if not (isinstance(self.top_k, int) and self.top_k >= 0):
            raise ValueError(f"--top-k {self.top_k}: must be an integer >= 0 (0 = no limit)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"--top-p {self.top_p}: must be in (0, 1]")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class TokenChooser:
    """Logits ``[b, V_padded]`` of rows ``rows`` -> one token per row (see the module docstring)."""

    def __init__(self, vocab_size: int, sampling: SamplingParams = SamplingParams(), banned=()):
        self.vocab_size, self.sampling = vocab_size, sampling
        self.banned = sorted({int(i) for i in banned if i is not None and 0 <= int(i) < vocab_size})
        self._generators: dict[int, torch.Generator] = {}

    def _generator(self, row: int) -> torch.Generator:
        if row not in self._generators:
            self._generators[row] = torch.Generator().manual_seed(self.sampling.seed + row)
        return self._generators[row]

    def __call__(self, logits: torch.Tensor, rows: list[int]) -> list[int]:
        logits = logits[..., :self.vocab_size].float().cpu()
        if self.banned:
            logits[..., self.banned] = float("-inf")
        s = self.sampling
        if s.greedy:
            return logits.argmax(dim=-1).tolist()
        logits = logits / s.temperature
        if s.top_k:
            kth = logits.topk(min(s.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if s.top_p < 1:
            ordered, index = logits.sort(dim=-1, descending=True)
            cum = ordered.softmax(dim=-1).cumsum(dim=-1)
            drop = cum - ordered.softmax(dim=-1) >= s.top_p  # keep up to and including the token reaching p
            logits = logits.masked_fill(drop.scatter(-1, index, drop), float("-inf"))
        probs = logits.softmax(dim=-1)
        return [int(torch.multinomial(probs[i], 1, generator=self._generator(r)))
                for i, r in enumerate(rows)]


HUGE_PAGE = 2 << 20


def _huge_page_buffer(nbytes: int) -> torch.Tensor:
    """``nbytes`` of uint8 in private anonymous memory advised for transparent huge pages, 2 MiB
    aligned (the tensor keeps the mapping alive)."""
    import mmap

    m = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    m.madvise(mmap.MADV_HUGEPAGE)
    buf = torch.frombuffer(m, dtype=torch.uint8)
    start = -buf.data_ptr() % HUGE_PAGE
    return buf[start:start + nbytes]


@torch.no_grad()
def weights_in_huge_pages(model: torch.nn.Module) -> int:
    """Decoding at small batch streams every weight from memory once per step: on CPU, move each
    parameter of at least 2 MiB into memory advised for transparent huge pages (fewer TLB misses;
    ~10-20% faster decoding steps measured here; transformers' mmapped safetensors get the page
    cache's huge pages the same way). Values are unchanged (copied). For a freshly loaded inference
    model only: parameter storage is replaced, so never on a model whose parameters are views of DDP /
    distributed-optimizer buffers. No-op off CPU or without ``MADV_HUGEPAGE``. Returns how many
    parameters moved."""
    import mmap

    if not hasattr(mmap, "MADV_HUGEPAGE"):
        return 0
    moved = 0
    for p in model.parameters():
        nbytes = p.numel() * p.element_size()
        if p.device.type != "cpu" or nbytes < HUGE_PAGE or not p.is_contiguous():
            continue
        data = _huge_page_buffer(nbytes).view(p.dtype).view(p.shape)
        data.copy_(p.data)
        p.data = data
        moved += 1
    return moved


def cut(inputs: ModelInputs, start: int, end: int) -> ModelInputs:
    """Positions ``[start, end)`` of the sequence fields; per-sample fields kept."""
    return replace(inputs, **{f.name: getattr(inputs, f.name)[:, start:end] for f in fields(inputs)
                              if f.name in SEQUENCE_FIELDS and getattr(inputs, f.name) is not None})


def without_images(inputs: ModelInputs) -> ModelInputs:
    return replace(inputs, images=None, cross_attention_states=None)


def stack(parts: list[ModelInputs]) -> ModelInputs:
    """Batch-1 inputs of equal length -> one batch (a field None in one is None in all)."""
    out = {}
    for f in fields(ModelInputs):
        values = [getattr(p, f.name) for p in parts]
        if all(v is None for v in values):
            out[f.name] = None
        elif any(v is None for v in values):
            raise ValueError(f"prompts differ in whether they have {f.name}: batch them separately")
        elif isinstance(values[0], tuple):  # images of several encoders: one tensor per encoder
            out[f.name] = tuple(torch.cat(parts, dim=0) for parts in zip(*values))
        else:
            out[f.name] = torch.cat(values, dim=0)
    return ModelInputs(**out)


def _logits(model, inputs: ModelInputs, inference_context=None) -> torch.Tensor:
    """The last position's logits ``[b, V_padded]`` (gathered over TP)."""
    out = model(inputs, inference_context=inference_context, runtime_gather_output=True)
    return out[:, -1]


def _finished(tokens: list[int], eos_id: int | None, max_new_tokens: int) -> bool:
    return len(tokens) >= max_new_tokens or (eos_id is not None and bool(tokens) and tokens[-1] == eos_id)


@torch.no_grad()
def generate(model, prompts: list[ModelInputs], max_new_tokens: int, *, vocab_size: int,
             eos_id: int | None = None, banned=(), sampling: SamplingParams = SamplingParams(),
             use_cache: bool = True, max_sequence_length: int | None = None,
             rows: list[int] | None = None) -> list[list[int]]:
    """New tokens for each prompt (see the module docstring). ``rows``: the prompts' global row
    numbers (sampling seeds; default 0..n-1). ``max_sequence_length``: the model's context; a prompt
    must leave room for one token, and generation stops at the context's end."""
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens {max_new_tokens}: must be an integer >= 1")
    if not prompts:
        return []
    device = next(model.parameters()).device
    prompts = [p.to(device) for p in prompts]
    rows = list(range(len(prompts))) if rows is None else rows
    lengths = [p.tokens.shape[1] for p in prompts]
    budgets = [max_new_tokens] * len(prompts)
    if max_sequence_length is not None:
        too_long = [n for n in lengths if n >= max_sequence_length]
        if too_long:
            raise ValueError(f"prompt of {too_long[0]} tokens: longer than the model's context of "
                             f"{max_sequence_length} positions minus one to generate")
        budgets = [min(max_new_tokens, max_sequence_length - n) for n in lengths]
    chooser = TokenChooser(vocab_size, sampling, banned)
    model.eval()
    if not use_cache:
        return [_uncached(model, p, n, chooser, eos_id, r) for p, n, r in zip(prompts, budgets, rows)]
    return _cached(model, prompts, lengths, budgets, chooser, eos_id, rows)


def _uncached(model, inputs: ModelInputs, max_new_tokens: int, chooser: TokenChooser, eos_id, row: int):
    out: list[int] = []
    while True:
        token = chooser(_logits(model, inputs), [row])[0]
        out.append(token)
        if _finished(out, eos_id, max_new_tokens):
            return out
        inputs = model.arch.extend_inputs(inputs, torch.tensor([[token]], device=inputs.tokens.device))


def _cached(model, prompts, lengths, budgets, chooser, eos_id, rows):
    from megatron.core.inference.contexts import StaticInferenceContext

    from megatron_vlm.runtime.cpu import device_mode_paused

    b, total = len(prompts), max(n + m for n, m in zip(lengths, budgets))
    device = prompts[0].tokens.device
    # every sample's inputs for all `total` positions (generated tokens filled in as they come)
    full = stack([model.arch.extend_inputs(p, torch.zeros(1, total - n, dtype=torch.long, device=device))
                  if total > n else p for p, n in zip(prompts, lengths)])
    tokens = full.tokens.clone()
    context = StaticInferenceContext(max_batch_size=b, max_sequence_length=total)
    start = min(lengths)
    logits = _logits(model, cut(full, 0, start), context)
    context.sequence_len_offset = start
    out: list[list[int]] = [[] for _ in range(b)]
    done = [False] * b
    with device_mode_paused():  # the steps name no device (the prefill allocated every cache)
        for t in range(start, total):
            # rows past their prompt and not finished choose a token (the others draw nothing)
            active = [i for i in range(b) if t >= lengths[i] and not done[i]]
            for i, token in zip(active, chooser(logits[active], [rows[i] for i in active]) if active else []):
                out[i].append(token)
                done[i] = _finished(out[i], eos_id, budgets[i])
                tokens[i, t] = token
            if all(done):
                break
            if t >= max(lengths):
                context.enable_decode_mode()  # every prompt is in the cache
            step = without_images(replace(cut(full, t, t + 1), tokens=tokens[:, t:t + 1]))
            logits = _logits(model, step, context)
            context.sequence_len_offset += 1
    return out
