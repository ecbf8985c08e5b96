"""(image files, prompt text) -> the model inputs generation starts from, laid out as training lays
out a sample (:class:`~megatron_vlm.data.samples.SequenceBuilder`: the arch's token layout, the same
tokenizer, the same image preprocessing through DALI), so that a trained model answers as it learned.

One prompt is a batch-1 :class:`~megatron_vlm.data.batch.ModelInputs`: ``tokens [1, L]`` =
``[bos] + image positions + prompt`` (inline layout: ``num_image_tokens`` image tokens per image;
marker layout: one ``<image>`` token per image, with ``text_image_mask [1, L, n]`` True from image
i's marker on, as in training), ``images [1, n, 3, S, S]``, ``image_mask [1, n]``. Several vision
encoders: ``images`` is a tuple of one ``[1, n, 3, S_e, S_e]`` per encoder (each image decoded once);
with the data router ``router_weights [1, E]`` from the request's ``encoder_weights``. Tiled Mllama
models (``max_tiles = T > 1``): ``images [1, n, T, 3, S, S]`` with ``aspect_ratio_ids [1, n]`` and
``aspect_ratio_mask [1, n, T]``, tiled as training tiles its shards.

Image files are checked (exists, a readable image) before anything is built; each problem is one
:class:`PromptError` line naming the file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from megatron_vlm.data.batch import ModelInputs
from megatron_vlm.data.dali_loader import model_images
from megatron_vlm.data.layout import TokenLayout
from megatron_vlm.data.samples import SequenceBuilder


class PromptError(ValueError):
    """Bad generation input (one line)."""


@dataclass
class Request:
    """One row of ``tools/generate.py``: image files and a prompt (and the data router's weights)."""
    prompt: str
    images: list[str] = field(default_factory=list)
    encoder_weights: list[float] | None = None


@dataclass
class PromptImages:
    """One prompt's preprocessed images: ``images`` ``[n, 3, S, S]`` (a tuple of one per encoder
    with several) or tiles ``[n, T, 3, S, S]`` with ``grid`` ``[n, 2]``."""
    images: torch.Tensor | tuple[torch.Tensor, ...]
    grid: torch.Tensor | None = None

    def select(self, start: int, end: int) -> "PromptImages":
        """Images ``start:end``."""
        images = (tuple(t[start:end] for t in self.images) if isinstance(self.images, tuple)
                  else self.images[start:end])
        return PromptImages(images, None if self.grid is None else self.grid[start:end])

    @property
    def count(self) -> int:
        return (self.images[0] if isinstance(self.images, tuple) else self.images).shape[0]


def read_image_file(path: str | os.PathLike) -> bytes:
    """The file's bytes, after checking that it is an image PIL can decode (DALI aborts on a
    corrupt file, so check first)."""
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    if not p.is_file():
        raise PromptError(f"--image {path}: no such file")
    try:
        with Image.open(p) as im:
            im.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise PromptError(f"--image {path}: not a readable image ({type(e).__name__}: {e})") from None
    return p.read_bytes()


class PromptBuilder:
    """Builds prompts for one model config + tokenizer (see the module docstring)."""

    def __init__(self, model_config, tokenizer, images_per_sample: int | None = None):
        from megatron_vlm.archs import get_arch

        self.cfg, self.tok = model_config, tokenizer
        self.layout = get_arch(model_config.arch).token_layout
        self.builder = SequenceBuilder.from_model_config(tokenizer, model_config)
        self.image = model_images(model_config)
        self.router_encoders = self.builder.router_encoders  # E with the data router, else None
        self.max_images = images_per_sample

    def tokens(self, prompt: str, num_images: int) -> list[int]:
        return self.builder.prompt_tokens(prompt, num_images)

    def weights_problem(self, request: Request) -> str | None:
        """Why the request's ``encoder_weights`` do not fit the model (data router), or None."""
        from megatron_vlm.data.encoder_weights import KEY, sample_problem

        if request.encoder_weights is not None and not self.router_encoders:
            return f"{KEY} given, but the model has no data router (several encoders, model.fusion.router 'data')"
        if not self.router_encoders or not request.images:
            return None
        return sample_problem(request.encoder_weights, self.router_encoders,
                              "--encoder-weights (or the --input row's \"encoder_weights\")")

    def build(self, prompt: str, images: "PromptImages | torch.Tensor | None",
              encoder_weights: list[float] | None = None) -> ModelInputs:
        """``images`` (preprocessed :class:`PromptImages`, or a ``[n, 3, S, S]`` tensor) or None
        -> one prompt; ``encoder_weights`` (E values) with the data router."""
        if torch.is_tensor(images):
            images = PromptImages(images)
        n = 0 if images is None else images.count
        tokens = torch.tensor([self.tokens(prompt, n)], dtype=torch.long)
        text_image_mask = None
        if self.layout is TokenLayout.MARKER and n:
            pos = torch.arange(tokens.shape[1])
            text_image_mask = (pos[:, None] >= 1 + torch.arange(n)[None, :])[None]  # marker i at 1 + i
        pixels = ratio_ids = ratio_mask = router_weights = None
        if images is not None:
            pixels = (tuple(t[None] for t in images.images) if isinstance(images.images, tuple)
                      else images.images[None])
            if images.grid is not None:
                from megatron_vlm.data.tiling import aspect_ratio_ids, tile_mask

                tiles = images.images.shape[1]
                ratio_ids, ratio_mask = aspect_ratio_ids(images.grid, tiles)[None], tile_mask(images.grid, tiles)[None]
            if self.router_encoders:
                from megatron_vlm.data.encoder_weights import KEY, weights_tensor

                router_weights = weights_tensor([{KEY: encoder_weights, "key": f"prompt {prompt[:40]!r}"}],
                                                self.router_encoders)
        return ModelInputs(tokens, images=pixels,
                           image_mask=None if images is None else torch.ones(1, n, dtype=torch.bool),
                           text_image_mask=text_image_mask, aspect_ratio_ids=ratio_ids,
                           aspect_ratio_mask=ratio_mask, router_weights=router_weights)

    def load_images(self, requests: list[Request]) -> list[PromptImages | None]:
        """Every request's images, preprocessed (one DALI run for all files); files checked first."""
        files = [read_image_file(p) for r in requests for p in r.images]
        for r in requests:
            if self.max_images is not None and len(r.images) > self.max_images:
                raise PromptError(f"{len(r.images)} images for one prompt: the model takes at most "
                                  f"{self.max_images} (data.images_per_sample)")
        if not files:
            return [None] * len(requests)
        from megatron_vlm.data.dali_pipeline import decode_images

        decoded = PromptImages(*decode_images(files, self.image))
        out, i = [], 0
        for r in requests:
            out.append(decoded.select(i, i + len(r.images)) if r.images else None)
            i += len(r.images)
        return out

    def build_all(self, requests: list[Request]) -> list[ModelInputs]:
        for r in requests:
            problem = self.weights_problem(r)
            if problem is not None:
                raise PromptError(f"prompt {r.prompt[:40]!r}: {problem}")
        return [self.build(r.prompt, images, r.encoder_weights)
                for r, images in zip(requests, self.load_images(requests))]
