#!/usr/bin/env python
"""Decoding speed, side by side in one run, on one converted LLaVA checkpoint (tiny but not trivial:
4 x 1024-wide Llama layers (~60M parameters), GQA 32/16 heads, vocab 1000, a 2-layer CLIP tower;
batch 1, fp32, one CPU thread):

* ours with the KV cache (``megatron_vlm.inference.engine``, megatron-core ``StaticInferenceContext``)
  against ours without it (the whole sequence recomputed per token), new tokens per second, at 64
  and 256 new tokens (target: >= 5x at 256);
* ours (cached) against transformers' ``generate`` (its own KV cache, greedy) on the same converted
  weights, images and prompts: time ratio (target: <= 1.0x) and whether the token ids agree.

``--hidden`` / ``--batch`` / ``--threads`` change the model width, the number of prompts and the
torch threads of both sides.

No eos stop on either side (every run produces exactly N tokens). Medians of ``--repeats``, A/B
interleaved. On CPU both sides decode without the CPU layer's device mode
(``runtime.cpu.device_mode_paused``, as the engine's decoding steps do; transformers never needs it).

    python benchmarks/generate.py            # ~6 minutes on a CPU core
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _run(work: str, lengths: list[int], repeats: int, prompt_len: int, hidden: int, batch: int,
         threads: int) -> dict:
    from megatron_vlm.archs import get_arch
    from megatron_vlm.conversion import tiny
    from megatron_vlm.conversion.convert import import_hf
    from megatron_vlm.conversion.llama import hf_vocab_size
    from megatron_vlm.conversion.verify import load_megatron
    from megatron_vlm.inference.engine import generate, stack, weights_in_huge_pages
    from megatron_vlm.runtime.cpu import device_mode_paused

    torch.set_num_threads(threads)
    work = Path(work)
    longest = max(lengths) + prompt_len + 16
    hf_dir = tiny.save_llava(work / "hf", vision_layers=2, text_layers=4, vocab=1000, hidden=hidden,
                             heads=hidden // 32, kv_heads=hidden // 64, ffn=3 * hidden, max_positions=longest + 16)
    import_hf(str(hf_dir), str(work / "ckpt"))
    cfg, model = load_megatron(str(work / "ckpt"))
    weights_in_huge_pages(model)  # as tools/generate.py's loading does
    family = get_arch(cfg.model.arch).family()
    prompts = [family.sample_inputs(cfg.model, seed=i, text_len=prompt_len) for i in range(batch)]
    vocab = hf_vocab_size(cfg.model.language)
    hf_model = family.hf_model_class().from_pretrained(str(hf_dir), local_files_only=True).eval()
    hf_model.generation_config.eos_token_id = None  # exactly N tokens, as ours with eos_id=None
    hf_inputs = family._hf_kwargs(hf_model, stack(prompts))
    length = prompts[0].tokens.shape[1]

    def ours(n, cache):
        return generate(model, prompts, n, vocab_size=vocab, eos_id=None, use_cache=cache)

    def theirs(n):
        with torch.no_grad(), device_mode_paused():  # as our decoding steps: neither side pays the CPU shim
            out = hf_model.generate(**hf_inputs, max_new_tokens=n, do_sample=False, pad_token_id=0)
        return out[:, length:].tolist()

    out = {}
    for n in lengths:
        ours(4, True), theirs(4)  # warm up
        times = {"cached": [], "uncached": [], "hf": []}
        tokens = {}
        for _ in range(repeats):
            for name, fn in (("cached", lambda: ours(n, True)), ("uncached", lambda: ours(n, False)),
                             ("hf", lambda: theirs(n))):
                start = time.perf_counter()
                tokens[name] = fn()
                times[name].append(time.perf_counter() - start)
        med = {k: statistics.median(v) for k, v in times.items()}
        out[n] = {"seconds": med, "tokens_equal_uncached": tokens["cached"] == tokens["uncached"],
                  "tokens_equal_hf": tokens["cached"] == tokens["hf"],
                  "new_tokens": sum(len(t) for t in tokens["cached"])}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--new-tokens", type=int, nargs="+", default=[64, 256])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--prompt-len", type=int, default=24, help="text tokens after the image tokens")
    p.add_argument("--hidden", type=int, default=1024, help="language hidden size (heads = hidden / 32)")
    p.add_argument("--batch", type=int, default=1, help="prompts decoded together")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads for both sides (decoding's small ops are fastest on one CPU thread)")
    args = p.parse_args(argv)
    from megatron_vlm.quiet import silence_known_warnings
    from megatron_vlm.runtime.spawn import run_distributed

    silence_known_warnings()
    with tempfile.TemporaryDirectory() as work:
        (res,) = run_distributed(_run, 1, work, args.new_tokens, args.repeats, args.prompt_len, args.hidden,
                                 args.batch, args.threads, threads=args.threads, timeout=3600)
    print(f"hidden {args.hidden}, batch {args.batch}, {args.threads} thread(s), median of {args.repeats}")
    print(f"{'new tokens':>10} | {'cached tok/s':>12} | {'uncached tok/s':>14} | {'cache speed-up':>14} | "
          f"{'HF tok/s':>9} | {'ours / HF time':>14} | same ids (uncached, HF)")
    for n, r in res.items():
        s = r["seconds"]
        k = r["new_tokens"]
        print(f"{n:>10} | {k / s['cached']:>12.1f} | {k / s['uncached']:>14.1f} | {s['uncached'] / s['cached']:>13.2f}x | "
              f"{k / s['hf']:>9.1f} | {s['cached'] / s['hf']:>13.2f}x | {r['tokens_equal_uncached']}, {r['tokens_equal_hf']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
