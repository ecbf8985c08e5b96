"""A transformers vision tower used as is inside ``VLMModel`` (``model.vision.hf_config`` set).

For vision towers megatron-core has no port of — today Mllama's (``mllama_vision_model``: tiles,
gated positional / aspect-ratio embeddings, a local and a gated global transformer, intermediate
layers concatenated into ``vision_output_dim`` features). The HF module's parameters live under
``vision_model.hf.*`` with HF's own names, so checkpoints convert by renaming only; in megatron
dist checkpoints they are ordinary replicated tensors (not split over TP), trainable or frozen
like any other vision parameter.

Contract (what ``VLMModel.encode_images`` expects of a vision model): ``forward(images [B, 3, H, W])``
-> features ``[B, k, output_size]``; ``output_size`` feeds the projector.

Mllama, single tile (``model.vision.max_tiles: 1``, images ``[B, 3, H, W]``): each image is one
tile (aspect ratio 1x1, ``aspect_ratio_id`` of ``[1, 1]``), the other ``max_num_tiles - 1`` tiles
are padding the HF model masks out, exactly as the HF processor does for an image that fits one
tile; features ``[B, k, output_size]``, k = ``(image_size // patch_size)^2 + 1`` (class token kept).
Tiled (``max_tiles = max_num_tiles = T``, images ``[B, T, 3, H, W]`` with ``aspect_ratio_ids`` [B]
and ``aspect_ratio_mask`` [B, T], see ``megatron_vlm.data.tiling``): HF's ``pixel_values`` as is;
features ``[B, T, k, output_size]`` of every tile, padded ones included (the cross-attention mask
hides them, as HF's ``cross_attention_mask`` does).

SigLIP (``siglip_vision_model``, warm start from a ``SiglipVisionModel``) is wrapped the same way
until a megatron-core SigLIP port (``CLIPViTModel(model_subtype="siglip")``) is wired in.
"""

from __future__ import annotations

import torch

SUPPORTED = ("mllama_vision_model", "siglip_vision_model")


def build_hf_vision_config(hf_config: dict):
    mt = hf_config.get("model_type")
    if mt not in SUPPORTED:
        raise ValueError(f"model.vision.hf_config.model_type={mt!r}: wrapped HF vision towers supported: "
                         f"{list(SUPPORTED)}")
    import transformers

    cls = transformers.MllamaVisionConfig if mt == "mllama_vision_model" else transformers.SiglipVisionConfig
    return cls(**{k: v for k, v in hf_config.items() if k != "model_type"})


def build_hf_vision_encoder(hf_config: dict, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    build_hf_vision_config(hf_config)  # checks the model_type
    cls = SiglipVisionEncoder if hf_config["model_type"] == "siglip_vision_model" else MllamaVisionEncoder
    return cls(hf_config, dtype)


class MllamaVisionEncoder(torch.nn.Module):
    def __init__(self, hf_config: dict, dtype: torch.dtype = torch.float32):
        super().__init__()
        from transformers import MllamaVisionModel

        config = build_hf_vision_config(hf_config)
        self.hf = MllamaVisionModel(config).to(dtype)
        self.output_size = config.vision_output_dim
        self.max_num_tiles = config.max_num_tiles
        ratios = [list(r) for r in config.supported_aspect_ratios]
        if [1, 1] not in ratios:
            raise ValueError("mllama vision: supported_aspect_ratios lacks [1, 1] (single-tile images)")
        self.aspect_ratio_id = 1 + ratios.index([1, 1])

    def forward(self, images: torch.Tensor, aspect_ratio_ids: torch.Tensor | None = None,
                aspect_ratio_mask: torch.Tensor | None = None) -> torch.Tensor:
        if images.dim() == 5:  # tiled
            b, t = images.shape[:2]
            if t != self.max_num_tiles or aspect_ratio_ids is None or aspect_ratio_mask is None:
                raise ValueError(f"mllama vision: tiled images {tuple(images.shape)} need {self.max_num_tiles} "
                                 f"tiles (the tower's max_num_tiles), aspect_ratio_ids and aspect_ratio_mask")
            out = self.hf(pixel_values=images[:, None], aspect_ratio_ids=aspect_ratio_ids.reshape(b, 1).long(),
                          aspect_ratio_mask=aspect_ratio_mask.reshape(b, 1, t).long())
            return out.last_hidden_state[:, 0]  # [b, T, k, output_size]
        b = images.shape[0]
        pixel_values = images.new_zeros(b, 1, self.max_num_tiles, *images.shape[1:])
        pixel_values[:, 0, 0] = images
        ids = torch.full((b, 1), self.aspect_ratio_id, dtype=torch.long, device=images.device)
        mask = torch.zeros(b, 1, self.max_num_tiles, dtype=torch.long, device=images.device)
        mask[..., 0] = 1
        out = self.hf(pixel_values=pixel_values, aspect_ratio_ids=ids, aspect_ratio_mask=mask)
        return out.last_hidden_state[:, 0, 0]  # [b, k, output_size] of the one real tile


class SiglipVisionEncoder(torch.nn.Module):
    """SigLIP (``siglip_vision_model``, built without the pooling head): features = its
    ``last_hidden_state`` (after ``post_layernorm``), ``k = (image_size // patch_size)^2`` (the grid
    floors: 384 px / 14 px -> 27 x 27), no class token."""

    def __init__(self, hf_config: dict, dtype: torch.dtype = torch.float32):
        super().__init__()
        from transformers import SiglipVisionModel

        config = build_hf_vision_config(dict(hf_config, vision_use_head=False))
        self.hf = SiglipVisionModel(config).to(dtype)
        self.output_size = config.hidden_size

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.hf(pixel_values=images).last_hidden_state
