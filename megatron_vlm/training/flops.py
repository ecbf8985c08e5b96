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


def _encoder(v, images: int) -> float:
    """Forward FLOPs of encoder ``v`` over ``images`` images (every tile of a tiled one)."""
    vt = images * v.max_tiles * v.seq_length
    vision = v.num_layers * _transformer_layer(vt, v.seq_length, v.hidden_size, v.num_attention_heads,
                                               v.num_attention_heads, v.ffn_hidden_size, gated=False)
    return vision + 2 * vt * 3 * v.patch_size ** 2 * v.hidden_size  # patch embedding


def _projector(tokens: int, width: int, h: int) -> float:
    return 2 * tokens * (width * h + h ** 2)


def _fusion(m, images: int) -> float:
    """Forward FLOPs of ``model.fusion`` over ``images`` images (several encoders): router MLP,
    weighted sum, or cross-attention (q, kv, scores, output) of the generalist's tokens over the
    specialists'."""
    from megatron_vlm.models.fusion import fusion_width, routed_encoders

    f, d = m.fusion, fusion_width(m)
    if f.method == "sequence_append":
        return 0.0
    routed = len(routed_encoders(m))
    k = m.encoder_image_tokens(m.generalist)
    router = 2 * images * (d * f.router_hidden_size + f.router_hidden_size * routed) if f.router == "learned" else 0
    if f.method == "weighted_average":
        return router + 2 * images * len(m.vision) * k * d
    keys = sum(m.encoder_image_tokens(v) for v in m.vision if v is not m.generalist)
    return router + 2 * images * (k * d * d + keys * d * 2 * d + 2 * k * keys * d + k * d * d)


def iteration_flops(cfg: Config, global_batch_size: int, cross_attention_layers: int = 0) -> float:
    """Training FLOPs of one iteration over ``global_batch_size`` samples: every vision encoder,
    their projector(s) and the fusion of several (``model.fusion``) included."""
    m, lang = cfg.model, cfg.model.language
    b, s = global_batch_size, lang.seq_length
    n_img = cfg.data.images_per_sample
    tokens = b * s
    groups = lang.num_query_groups or lang.num_attention_heads
    self_layers = lang.num_layers - cross_attention_layers
    lm = self_layers * _transformer_layer(tokens, s, lang.hidden_size, lang.num_attention_heads,
                                          groups, lang.ffn_hidden_size, gated=True)
    lm += 2 * tokens * lang.hidden_size * lang.vocab_size  # output layer
    tiles = m.generalist.max_tiles  # Mllama tiling: every tile (padded ones too) goes through the encoder
    k = tiles * m.num_image_tokens
    if cross_attention_layers:
        lm += cross_attention_layers * _cross_attention_layer(
            tokens, b * n_img * k, n_img * k, lang.hidden_size, lang.num_attention_heads, groups,
            lang.ffn_hidden_size)
    # forward 1x, weight and input gradients 1x each; a frozen projector (and fusion) still passes
    # input gradients to a trainable encoder
    h, images = lang.hidden_size, b * n_img
    frozen = [m.encoder_frozen(v) for v in m.vision]
    vision = sum((1 if fz else 3) * _encoder(v, images) for v, fz in zip(m.vision, frozen))

    def projector_factor(inputs_frozen: bool) -> int:
        return 3 if not m.freeze_projector else (1 if inputs_frozen else 2)

    if not m.multi_encoder:
        return 3 * lm + projector_factor(frozen[0]) * _projector(images * k, m.vision[0].hidden_size, h) + vision
    after_all = projector_factor(all(frozen))
    if m.fusion.space == "projected":
        projector = sum(projector_factor(fz) * _projector(images * m.encoder_image_tokens(v), v.hidden_size, h)
                        for v, fz in zip(m.vision, frozen))
    else:
        projector = after_all * _projector(images * k, m.generalist.hidden_size, h)
    return 3 * lm + projector + after_all * _fusion(m, images) + vision


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
