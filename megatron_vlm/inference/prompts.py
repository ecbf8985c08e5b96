"""(image files, prompt text) -> the model inputs generation starts from, laid out as training lays
out a sample (:class:`~megatron_vlm.data.samples.SequenceBuilder`: the arch's token layout, the same
tokenizer, the same image preprocessing through DALI), so that a trained model answers as it learned.

One prompt is a batch-1 :class:`~megatron_vlm.data.batch.ModelInputs`: ``tokens [1, L]`` =
``[bos] + image positions + prompt`` (inline layout: ``num_image_tokens`` image tokens per image;
marker layout: one ``<image>`` token per image, with ``text_image_mask [1, L, n]`` True from image
i's marker on, as in training), ``images [1, n, 3, S, S]``, ``image_mask [1, n]``.

Image files are checked (exists, a readable image) before anything is built; each problem is one
:class:`PromptError` line naming the file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from megatron_vlm.data.batch import ModelInputs
from megatron_vlm.data.dali_loader import image_spec
from megatron_vlm.data.layout import TokenLayout
from megatron_vlm.data.samples import SequenceBuilder


class PromptError(ValueError):
    """Bad generation input (one line)."""


@dataclass
class Request:
    """One row of ``tools/generate.py``: image files and a prompt."""
    prompt: str
    images: list[str] = field(default_factory=list)


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
        self.image = image_spec(model_config.vision_encoder)
        self.max_images = images_per_sample

    def tokens(self, prompt: str, num_images: int) -> list[int]:
        return self.builder.prompt_tokens(prompt, num_images)

    def build(self, prompt: str, images: torch.Tensor | None) -> ModelInputs:
        """``images`` ``[n, 3, S, S]`` (preprocessed) or None -> one prompt."""
        n = 0 if images is None else images.shape[0]
        tokens = torch.tensor([self.tokens(prompt, n)], dtype=torch.long)
        text_image_mask = None
        if self.layout is TokenLayout.MARKER and n:
            pos = torch.arange(tokens.shape[1])
            text_image_mask = (pos[:, None] >= 1 + torch.arange(n)[None, :])[None]  # marker i at 1 + i
        return ModelInputs(tokens, images=None if images is None else images[None],
                           image_mask=None if images is None else torch.ones(1, n, dtype=torch.bool),
                           text_image_mask=text_image_mask)

    def load_images(self, requests: list[Request]) -> list[torch.Tensor | None]:
        """Every request's images, preprocessed (one DALI run for all files); files checked first."""
        tiles = getattr(self.cfg.vision_encoder, "max_tiles", 1)
        if tiles > 1 and any(r.images for r in requests):
            raise PromptError(f"model.vision.max_tiles={tiles}: generation from image files supports "
                              "single-tile models only (tiled Mllama images are not built here yet)")
        files = [read_image_file(p) for r in requests for p in r.images]
        for r in requests:
            if self.max_images is not None and len(r.images) > self.max_images:
                raise PromptError(f"{len(r.images)} images for one prompt: the model takes at most "
                                  f"{self.max_images} (data.images_per_sample)")
        if not files:
            return [None] * len(requests)
        from megatron_vlm.data.dali_pipeline import decode_images

        decoded = decode_images(files, self.image)
        out, i = [], 0
        for r in requests:
            out.append(decoded[i:i + len(r.images)] if r.images else None)
            i += len(r.images)
        return out

    def build_all(self, requests: list[Request]) -> list[ModelInputs]:
        return [self.build(r.prompt, images) for r, images in zip(requests, self.load_images(requests))]
