"""Photo-like synthetic test images (no files needed): smooth gradients + stripes + noise."""

from __future__ import annotations

import numpy as np
from PIL import Image


def gradient_image(h: int, w: int, seed: int, period: int = 40, step: float = 6, noise: float = 12) -> Image.Image:
    """RGB ``h`` x ``w``: red = a horizontal ramp, green = a vertical ramp, blue = diagonal stripes
    ``(x + y) % period * step``; plus Gaussian noise of std ``noise`` (seeded)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    smooth = np.stack([x * 255 / max(w - 1, 1), y * 255 / max(h - 1, 1), (x + y) % period * step], -1)
    return Image.fromarray(np.clip(smooth + rng.normal(0, noise, (h, w, 3)), 0, 255).astype(np.uint8))
