"""Mllama (Llama-3.2-Vision) image tiling (``model.vision.max_tiles = T > 1``): the rules of
transformers' ``MllamaImageProcessor``, and the DALI graph piece that applies them per sample.

An image of H x W px becomes a grid of ``nh x nw`` tiles of ``S = image_size`` px, ``nh * nw <= T``:

1. grid: the supported grids are every ``(nh, nw)`` with ``nh * nw <= T``, in Mllama's order
   (``nh`` major). Grid g scales the image by ``min(nh S / H, nw S / W)``; the smallest scale >= 1
   wins (upscale the least), else the largest one (downscale the least); ties go to the smaller
   canvas, then to the earlier grid. Compared exactly, in integers.
2. resize, keeping the aspect ratio, to fit the ``nh S x nw S`` canvas (each side first clipped to
   ``[S, canvas side]``; the other side ``floor(side x scale)`` in float64, as the processor does),
3. pad right and bottom with black to the canvas, normalise (the padding becomes ``-mean/std``),
4. split row-major into ``nh * nw`` tiles ``[3, S, S]`` (tile ``i * nw + j``); tiles up to T are 0.

``aspect_ratio_id`` = 1 + the grid's index among the supported grids (0 = no image);
``aspect_ratio_mask`` ``[T]`` True on the first ``nh * nw`` tiles. Both follow from the grid, which
the DALI graph returns with the tiles.
"""

from __future__ import annotations

import numpy as np
import torch

MLLAMA_TOWER = "mllama_vision_model"
HF_DEFAULT_MAX_NUM_TILES = 4  # MllamaVisionConfig's default


def supported_grids(max_tiles: int) -> list[tuple[int, int]]:
    """Every ``(nh, nw)`` with ``nh * nw <= max_tiles``, in Mllama's order (its supported_aspect_ratios)."""
    return [(a, b) for a in range(1, max_tiles + 1) for b in range(1, max_tiles + 1) if a * b <= max_tiles]


def aspect_ratio_ids(grid: torch.Tensor, max_tiles: int) -> torch.Tensor:
    """``grid`` ``[..., 2]`` (nh, nw) -> int64 ``[...]``: 1 + index among :func:`supported_grids`."""
    table = torch.zeros(max_tiles + 1, max_tiles + 1, dtype=torch.long)
    for i, (a, b) in enumerate(supported_grids(max_tiles)):
        table[a, b] = i + 1
    grid = grid.long()
    return table[grid[..., 0], grid[..., 1]]


def tile_mask(grid: torch.Tensor, max_tiles: int) -> torch.Tensor:
    """``grid`` ``[..., 2]`` -> bool ``[..., max_tiles]``: True on the image's ``nh * nw`` tiles."""
    count = (grid[..., 0] * grid[..., 1]).long()
    return torch.arange(max_tiles, device=grid.device) < count[..., None]


def tiling_problem(section: str, vision, layout: str) -> str | None:
    """One-line reason why ``vision.max_tiles > 1`` cannot work with this config, or None."""
    t = vision.max_tiles
    where = f"{section}.max_tiles={t}"
    if layout != "marker":
        return f"{where}: tiles need the cross_attention arch (marker token layout), not the {layout} layout"
    hf = vision.hf_config or {}
    if hf.get("model_type") != MLLAMA_TOWER:
        return f"{where}: tiles need the wrapped Mllama vision tower ({section}.hf_config model_type {MLLAMA_TOWER!r})"
    n = hf.get("max_num_tiles", HF_DEFAULT_MAX_NUM_TILES)
    if n != t:
        return f"{where}: must be 1 or the Mllama tower's max_num_tiles={n}"
    ratios = hf.get("supported_aspect_ratios")
    grids = [list(g) for g in supported_grids(t)]
    if ratios is not None and [list(r) for r in ratios] != grids:
        return (f"{where}: the tower's supported_aspect_ratios {[list(r) for r in ratios]} differ from "
                f"the {t}-tile grids {grids} the Mllama processor uses")
    return None


# ------------------------------------------------------------------------------------------------
# DALI
# ------------------------------------------------------------------------------------------------

def _vector(values) -> "object":
    from nvidia.dali import types

    return types.Constant(np.asarray(values, np.int64))


def dali_grid(height, width, max_tiles: int, tile: int):
    """DALI DataNodes (int64 scalars per sample) ``(nh, nw, new_h, new_w)``: the grid (rule 1) and
    the resized size (rule 2) of a ``height x width`` image."""
    import nvidia.dali.math as dmath
    from nvidia.dali import fn, types

    def i64(x):
        return fn.cast(x, dtype=types.INT64)

    def rows(values):  # a constant column [R, 1]
        return types.Constant(np.asarray(values, np.int64).reshape(-1, 1))

    grids = supported_grids(max_tiles)
    r = len(grids)
    a, b = rows([g[0] for g in grids]), rows([g[1] for g in grids])
    # scale of grid g = num / den: a S / H when a/H <= b/W, else b S / W
    by_height = i64(a * width <= b * height)
    num = by_height * a * tile + (1 - by_height) * b * tile
    den = by_height * height + (1 - by_height) * width
    up = i64(num >= den)
    any_up = fn.reductions.max(up)
    group = up * any_up + (1 - up) * (1 - any_up)  # the candidates: upscaling ones if any, else all
    sign = 2 * any_up - 1                          # upscaling: smallest scale wins; else largest
    t = lambda x: fn.transpose(x, perm=[1, 0])  # noqa: E731
    worse = (num * t(den) - t(num) * den) * sign   # [R, R] > 0: grid g is worse than grid q
    beats_all = fn.reductions.min(i64(worse <= 0) + (1 - t(group)), axes=[1], keep_dims=True)
    best = group * i64(beats_all >= 1)             # [R, 1] the grids at the winning scale
    key = rows([ga * gb * r + i for i, (ga, gb) in enumerate(grids)])  # smaller canvas, then earlier
    choice = fn.reductions.min(key + (1 - best) * (max_tiles * r + r)) % r
    chosen = i64(rows(range(r)) == choice)
    nh, nw = fn.reductions.sum(chosen * a), fn.reductions.sum(chosen * b)
    # rule 2, in float64 like the processor
    target_h, target_w = dmath.clamp(height, tile, nh * tile), dmath.clamp(width, tile, nw * tile)
    hf, wf, thf, twf = (fn.cast(x, dtype=types.FLOAT64) for x in (height, width, target_h, target_w))
    scale_h, scale_w = thf / hf, twf / wf
    width_first = i64(scale_w < scale_h)
    h_of_w = dmath.min(dmath.max(i64(dmath.floor(hf * scale_w)), 1), target_h)
    w_of_h = dmath.min(dmath.max(i64(dmath.floor(wf * scale_h)), 1), target_w)
    new_h = width_first * h_of_w + (1 - width_first) * target_h
    new_w = width_first * target_w + (1 - width_first) * w_of_h
    return nh, nw, new_h, new_w


def dali_tiles(encoded, decode_device: str, tile: int, max_tiles: int, mean, std):
    """DALI graph piece: encoded images -> (tiles float32 ``[max_tiles, 3, tile, tile]`` normalised
    with ``mean``/``std`` (0..1 scale), grid int64 ``[2]`` = (nh, nw)). Decode on ``decode_device``
    (``cpu`` | ``mixed``); resize, pad, normalise and split run where the decoded image lives."""
    from nvidia.dali import fn, types

    hw = fn.peek_image_shape(encoded, dtype=types.INT64)
    nh, nw, new_h, new_w = dali_grid(hw[0], hw[1], max_tiles, tile)
    images = fn.decoders.image(encoded, device=decode_device, output_type=types.RGB)
    images = fn.resize(images, resize_x=fn.cast(new_w, dtype=types.FLOAT), resize_y=fn.cast(new_h, dtype=types.FLOAT),
                       interp_type=types.INTERP_LINEAR, antialias=True)
    canvas = fn.cast(nh * _vector([tile, 0]) + nw * _vector([0, tile]), dtype=types.INT32)
    images = fn.pad(images, axes=[0, 1], shape=canvas, fill_value=0)
    images = fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="CHW",
                                      mean=[255.0 * m for m in mean], std=[255.0 * s for s in std])
    # [3, nh S, nw S] -> [3, nh, S, nw, S] -> [nh, nw, 3, S, S] -> [nh nw, 3, S, S] -> pad to max_tiles
    split = _vector([3, 0, tile, 0, tile]) + nh * _vector([0, 1, 0, 0, 0]) + nw * _vector([0, 0, 0, 1, 0])
    tiles = fn.transpose(fn.reshape(images, shape=fn.cast(split, dtype=types.INT32)), perm=[1, 3, 0, 2, 4])
    flat = _vector([0, 3, tile, tile]) + nh * nw * _vector([1, 0, 0, 0])
    tiles = fn.pad(fn.reshape(tiles, shape=fn.cast(flat, dtype=types.INT32)), axes=[0], shape=[max_tiles],
                   fill_value=0)
    grid = nh * _vector([1, 0]) + nw * _vector([0, 1])
    return tiles, grid
