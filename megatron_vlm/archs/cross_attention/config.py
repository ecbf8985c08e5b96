"""The ``cross_attention`` arch's config section ``model.cross_attention`` and layer placement.

Layout (Mllama's): ``language.num_layers`` counts ALL layers; cross-attention (CA) layers are
layers of their own at global indices given by ``layers`` (wins) or by ``every``:
``[i for i in range(num_layers) if i % (every + 1) == every - 1]``, i.e. a CA layer in front of
text layers ``every-1, 2*every-1, ...`` of the text-only stack, where HF's conversion of Meta's
checkpoints puts them: ``every=4`` with 40 layers -> [3, 8, 13, ..., 38] (Llama-3.2-11B-Vision),
with 100 layers -> [3, 8, ..., 98] (90B).
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_vlm.config import Config, ConfigError, ModelConfig

# text rows that may attend no image: "zero" (Meta's reference: the CA layer adds exactly 0)
# or "hf" (transformers' Mllama: the attention branch still adds gated attention over all images)
TEXT_ROW_MODES = ("zero", "hf")


@dataclass
class CrossAttentionConfig:
    every: int = 4          # a cross-attention layer after every `every` self-attention layers
    layers: list[int] | None = None  # explicit global indices in the combined layer list (wins)
    text_rows_without_image: str = "zero"  # one of TEXT_ROW_MODES


def cross_attention_layer_indices(num_layers: int, every: int | None = 4,
                                  layers: list[int] | None = None) -> list[int]:
    """Global indices of the CA layers in the combined layer list (see module docstring)."""
    if layers is not None:
        idx = [int(i) for i in layers]
        bad = [i for i in idx if not 0 <= i < num_layers]
        if bad or len(set(idx)) != len(idx):
            raise ValueError(f"model.cross_attention.layers={list(layers)}: must be distinct indices in "
                             f"[0, model.language.num_layers={num_layers})")
        return sorted(idx)
    if not isinstance(every, int) or every < 1:
        raise ValueError(f"model.cross_attention.every={every!r}: must be a positive integer")
    idx = [i for i in range(num_layers) if i % (every + 1) == every - 1]
    if not idx:
        raise ValueError(f"model.cross_attention.every={every} with model.language.num_layers={num_layers} "
                         f"places no cross-attention layer (the first sits at index {every - 1}, after "
                         f"{every - 1} self-attention layers); allowed: num_layers >= {every} for this "
                         f"cadence, or every <= {num_layers}")
    return idx


def text_layer_indices(num_layers: int, ca_indices: list[int]) -> list[int]:
    """Global indices of the self-attention layers: text-only decoder layer j sits at entry j."""
    ca = set(ca_indices)
    return [i for i in range(num_layers) if i not in ca]



def layer_indices(mc: ModelConfig) -> list[int]:
    """The CA layer indices of a model config."""
    ca = mc.cross_attention
    return cross_attention_layer_indices(mc.language.num_layers, ca.every, ca.layers)


def validate(cfg: Config) -> None:
    ca = cfg.model.cross_attention
    if ca.layers is None and (not isinstance(ca.every, int) or isinstance(ca.every, bool) or ca.every < 1):
        raise ConfigError(f"model.cross_attention.every={ca.every!r}: must be a positive integer")
    if ca.text_rows_without_image not in TEXT_ROW_MODES:
        raise ConfigError(f"model.cross_attention.text_rows_without_image={ca.text_rows_without_image!r}: "
                          f"allowed {list(TEXT_ROW_MODES)}")
    try:
        layer_indices(cfg.model)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    p = cfg.parallel
    tp = p.tensor_model_parallel_size
    if p.sequence_parallel and tp > 1:  # the image features are scattered along n*k over the TP ranks
        # k: feature tokens per image (model.tokens_per_image: every tile's with Mllama tiling)
        k = getattr(cfg.model.generalist, "max_tiles", 1) * cfg.model.num_image_tokens
        nk = cfg.data.images_per_sample * k
        if nk % tp:
            raise ConfigError(f"data.images_per_sample x model image tokens = {cfg.data.images_per_sample} x "
                              f"{k} = {nk}: must be divisible by "
                              f"parallel.tensor_model_parallel_size={tp} with sequence_parallel (the "
                              f"cross-attention K/V inputs are split over the TP ranks); allowed: image "
                              f"tokens per sample a multiple of {tp}, or sequence_parallel off")


def place_text_layers(mc: ModelConfig, text_layers: int) -> list[int]:
    """Warm start from a text-only decoder of ``text_layers`` layers: the smallest
    ``language.num_layers`` whose layout (``model.cross_attention.every``) leaves exactly
    ``text_layers`` self-attention layers; returns their indices (text layer j -> entry j)."""
    every = mc.cross_attention.every
    mc.cross_attention.layers = None
    if isinstance(every, int) and not isinstance(every, bool) and every - 1 > text_layers >= 1:
        raise ValueError(f"model.cross_attention.every={every}: the text model has {text_layers} layer(s), "
                         f"but this cadence puts the first cross-attention layer after {every - 1} "
                         f"self-attention layers (the smallest text model for every={every} has {every - 1} "
                         f"layers); allowed for {text_layers} text layer(s): every <= {text_layers + 1}")
    for total in range(text_layers + 1, 3 * text_layers + every + 3):
        try:
            ca = cross_attention_layer_indices(total, every, None)
        except ValueError:
            continue
        if len(text_layer_indices(total, ca)) == text_layers:
            mc.language.num_layers = total
            return text_layer_indices(total, ca)
    raise ValueError(f"model.cross_attention.every={every}: no layer count gives {text_layers} "
                     f"self-attention layers")
