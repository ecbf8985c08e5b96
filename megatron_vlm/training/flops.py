"""Model FLOPs per training iteration (Megatron's counting: 2 FLOPs per multiply-add, backward =
2x forward, attention scores counted in full even when causal), extended to the vision encoder,
the projector and cross-attention layers. Frozen encoders cost forward only.
"""

from __future__ import annotations

from megatron_vlm.config import Config

# Dense peak TFLOP/s per GPU used for MFU when --peak-tflops is not given.
PEAK_TFLOPS = {
    ("H100", "bf16"): 989.0, ("H100", "fp8"): 1979.0, ("H100", "fp32"): 494.0,
    ("H200", "bf16"): 989.0, ("H200", "fp8"): 1979.0, ("H200", "fp32"): 494.0,
    ("A100", "bf16"): 312.0, ("A100", "fp32"): 156.0,
}


def _transformer_layer(tokens: int, seq: int, h: int, heads: int, groups: int, ffn: int,
                       gated: bool) -> float:
    d = h // heads
    qkv = 2 * tokens * h * (heads + 2 * groups) * d
    scores = 2 * 2 * tokens * seq * heads * d  # QK^T and AV
    proj = 2 * tokens * heads * d * h
    mlp = 2 * tokens * h * ffn * (2 if gated else 1) + 2 * tokens * ffn * h
    return qkv + scores + proj + mlp


def _cross_attention_layer(tokens: int, image_tokens: int, kv_per_sample: int, h: int, heads: int,
                           groups: int, ffn: int) -> float:
    d = h // heads
    q = 2 * tokens * h * heads * d
    kv = 2 * image_tokens * h * 2 * groups * d
    scores = 2 * 2 * tokens * kv_per_sample * heads * d
    proj = 2 * tokens * heads * d * h
    mlp = 2 * tokens * h * ffn * 2 + 2 * tokens * ffn * h
    return q + kv + scores + proj + mlp


def iteration_flops(cfg: Config, global_batch_size: int, cross_attention_layers: int = 0) -> float:
    """Training FLOPs of one iteration over ``global_batch_size`` samples."""
    m, lang, v = cfg.model, cfg.model.language, cfg.model.vision_encoder
    b, s = global_batch_size, lang.seq_length
    n_img = cfg.data.images_per_sample
    tokens = b * s
    groups = lang.num_query_groups or lang.num_attention_heads
    self_layers = lang.num_layers - cross_attention_layers
    lm = self_layers * _transformer_layer(tokens, s, lang.hidden_size, lang.num_attention_heads,
                                          groups, lang.ffn_hidden_size, gated=True)
    lm += 2 * tokens * lang.hidden_size * lang.vocab_size  # output layer
    tiles = v.max_tiles  # Mllama tiling: every tile (padded ones too) goes through the encoder
    k = tiles * m.num_image_tokens
    if cross_attention_layers:
        lm += cross_attention_layers * _cross_attention_layer(
            tokens, b * n_img * k, n_img * k, lang.hidden_size, lang.num_attention_heads, groups,
            lang.ffn_hidden_size)
    vt = b * n_img * tiles * v.seq_length
    vision = v.num_layers * _transformer_layer(vt, v.seq_length, v.hidden_size, v.num_attention_heads,
                                               v.num_attention_heads, v.ffn_hidden_size, gated=False)
    vision += 2 * vt * 3 * v.patch_size ** 2 * v.hidden_size  # patch embedding
    projector = 2 * b * n_img * k * (v.hidden_size * lang.hidden_size + lang.hidden_size ** 2)
    # forward 1x, weight and input gradients 1x each; a frozen projector still passes input
    # gradients to a trainable encoder
    vision_factor = 1 if m.freeze_vision else 3
    projector_factor = 3 if not m.freeze_projector else (1 if m.freeze_vision else 2)
    return 3 * lm + projector_factor * projector + vision_factor * vision


def peak_tflops(cfg: Config) -> tuple[float | None, str]:
    """(peak TFLOP/s per device, where it came from) for MFU."""
    if cfg.training.peak_tflops:
        return cfg.training.peak_tflops, "--peak-tflops"
    import torch

    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        precision = "fp8" if cfg.training.fp8_format else "bf16" if cfg.training.bf16 else "fp32"
        for (gpu, prec), value in PEAK_TFLOPS.items():
            if gpu in name and prec == precision:
                return value, f"{gpu} dense {precision}"
        return None, f"unknown GPU {name!r}: pass --peak-tflops"
    # a CPU has no peak we know (a measured GEMM rate is not one: MFU read up to 160% against it)
    return None, "CPU: no known peak, TFLOP/s only; --peak-tflops gives one"


def measured_cpu_peak(n: int = 512, repeats: int = 10) -> float:
    """Achieved fp32 GEMM TFLOP/s on this CPU process (the CPU has no published per-core peak)."""
    import time

    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n ** 3 * repeats / (time.perf_counter() - start) / 1e12
