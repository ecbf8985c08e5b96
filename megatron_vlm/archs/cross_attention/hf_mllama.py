"""``MllamaForConditionalGeneration`` (Llama-3.2-Vision) <-> our ``cross_attention`` arch.

Text decoder (declarative, ``{i}`` = layer index, the same on both sides: Mllama keeps its
cross-attention layers as layers of their own, and so does our arch — ``model.cross_attention.layers``
= HF ``text_config.cross_attention_layers``). Megatron prefix ``language_model.``, HF prefix
``language_model.model.``:

    self-attention layers: the Llama layer map (``llama.layer_rules``: fused QKV, SwiGLU fc1)
    cross-attention layers:
      decoder.layers.{i}.input_layernorm.weight             layers.{i}.input_layernorm.weight
      decoder.layers.{i}.cross_attention.linear_q.weight    layers.{i}.cross_attn.q_proj.weight
      decoder.layers.{i}.cross_attention.linear_kv.weight   layers.{i}.cross_attn.{k,v}_proj.weight   KV
      decoder.layers.{i}.cross_attention.q_layernorm.weight layers.{i}.cross_attn.q_norm.weight
      decoder.layers.{i}.cross_attention.k_layernorm.weight layers.{i}.cross_attn.k_norm.weight
      decoder.layers.{i}.cross_attention.linear_proj.weight layers.{i}.cross_attn.o_proj.weight
      decoder.layers.{i}.cross_attn_attn_gate               layers.{i}.cross_attn_attn_gate
      decoder.layers.{i}.cross_attn_mlp_gate                layers.{i}.cross_attn_mlp_gate
      decoder.layers.{i}.pre_mlp_layernorm.weight           layers.{i}.post_attention_layernorm.weight
      decoder.layers.{i}.mlp.linear_fc{1,2}.weight          layers.{i}.mlp.{gate,up,down}_proj   GateUp
    embedding.word_embeddings.weight   embed_tokens.weight      PadRows: vocab + 8 rows (Mllama's extra
                                                                special-token rows, <|image|> among them)
    output_layer.weight                language_model.lm_head.weight   PadRows: vocab rows
    decoder.final_layernorm.weight     norm.weight

``hf_mllama_text.py`` applies this text map to whole in-memory state dicts (model tests, warm starts).

Vision tower: **carried as a wrapped HF module**, not ported. Mllama's tower (tiles, gated
positional and aspect-ratio embeddings, a local and a gated global transformer, five intermediate
layers concatenated into 7680-dim features) has no megatron-core counterpart; our model holds
transformers' ``MllamaVisionModel`` as ``vision_model.hf`` (``model.vision.hf_config``, see
``megatron_vlm/models/hf_vision.py``), so its tensors map by renaming only
(``vision_model.hf.X`` <-> ``vision_model.X``). The projector (one Linear with bias) is megatron's
``affine`` MultimodalProjector (``vision_projection.encoder.{weight,bias}`` <->
``multi_modal_projector.{weight,bias}``). Images enter as single tiles (aspect ratio 1x1) or, with
``model.vision.max_tiles`` = the tower's ``max_num_tiles``, tiled as Mllama's processor tiles them
(``megatron_vlm/data/tiling.py``); ``max_tiles`` is a data setting, not part of the HF config.
"""

from __future__ import annotations

import dataclasses

import torch

from megatron_vlm.archs.cross_attention.config import CrossAttentionConfig, layer_indices
from megatron_vlm.config import ModelConfig, VisionConfig
from megatron_vlm.conversion import llama
from megatron_vlm.conversion.families import Family, prefix_renamer
from megatron_vlm.conversion.hf_io import read_image_stats
from megatron_vlm.data.batch import ModelInputs
from megatron_vlm.conversion.mapping import (GATE_UP, KV, ConversionError, Pair, PadRows, Rule,
                                             expand)

EXTRA_EMBEDDING_ROWS = 8  # Mllama's embedding has vocab_size + 8 rows (<|image|> among the extra ones)


RENAME = prefix_renamer([
    ("model.vision_model.", "vision_model."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("model.language_model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
])


def cross_layer_rules(num_groups: int) -> list[Rule]:
    a = "layers.{j}.cross_attn."
    return [
        Rule("decoder.layers.{i}.input_layernorm.weight", "layers.{j}.input_layernorm.weight"),
        Rule("decoder.layers.{i}.cross_attention.linear_q.weight", a + "q_proj.weight"),
        Rule("decoder.layers.{i}.cross_attention.linear_kv.weight", (a + "k_proj.weight", a + "v_proj.weight"),
             KV(num_groups)),
        Rule("decoder.layers.{i}.cross_attention.q_layernorm.weight", a + "q_norm.weight"),
        Rule("decoder.layers.{i}.cross_attention.k_layernorm.weight", a + "k_norm.weight"),
        Rule("decoder.layers.{i}.cross_attention.linear_proj.weight", a + "o_proj.weight"),
        Rule("decoder.layers.{i}.cross_attn_attn_gate", "layers.{j}.cross_attn_attn_gate"),
        Rule("decoder.layers.{i}.cross_attn_mlp_gate", "layers.{j}.cross_attn_mlp_gate"),
        Rule("decoder.layers.{i}.pre_mlp_layernorm.weight", "layers.{j}.post_attention_layernorm.weight"),
        Rule("decoder.layers.{i}.mlp.linear_fc1.weight",
             ("layers.{j}.mlp.gate_proj.weight", "layers.{j}.mlp.up_proj.weight"), GATE_UP),
        Rule("decoder.layers.{i}.mlp.linear_fc2.weight", "layers.{j}.mlp.down_proj.weight"),
    ]


def text_pairs(mc: ModelConfig) -> list[Pair]:
    lang = mc.language
    heads, groups = lang.num_attention_heads, lang.num_query_groups or lang.num_attention_heads
    v = llama.hf_vocab_size(lang)
    ca = set(layer_indices(mc))
    m, h = "language_model.", "language_model.model."
    out = expand([Rule("embedding.word_embeddings.weight", "embed_tokens.weight",
                       PadRows(v + EXTRA_EMBEDDING_ROWS, lang.vocab_size))], mcore_prefix=m, hf_prefix=h)
    self_rules, cross_rules = llama.layer_rules(heads, groups), cross_layer_rules(groups)
    for i in range(lang.num_layers):
        out += expand(cross_rules if i in ca else self_rules, [i], m, h)
    out += expand([Rule("decoder.final_layernorm.weight", "norm.weight")], mcore_prefix=m, hf_prefix=h)
    out.append(Pair(m + "output_layer.weight", ("language_model.lm_head.weight",),
                    PadRows(v, lang.vocab_size)))
    return out


def vision_keys(hf_vision_config: dict) -> list[str]:
    """State-dict keys of transformers' MllamaVisionModel for this config (built on 'meta')."""
    from transformers import MllamaVisionModel

    from megatron_vlm.models.hf_vision import build_hf_vision_config

    with torch.device("meta"):
        model = MllamaVisionModel(build_hf_vision_config(hf_vision_config))
    return list(model.state_dict().keys())


def structure(mc: ModelConfig) -> dict:
    d = dataclasses.asdict(mc)
    d.pop("sections")
    d["vision"] = {k: v for k, v in d["vision"][0].items() if k not in ("image_mean", "image_std", "max_tiles")}
    hf = dict(d["vision"]["hf_config"] or {})
    for k in ("transformers_version", "architectures", "dtype", "torch_dtype", "_name_or_path",
              "id2label", "label2id", "output_hidden_states", "return_dict", "output_attentions",
              "chunk_size_feed_forward", "is_encoder_decoder", "problem_type", "initializer_range"):
        hf.pop(k, None)
    d["vision"]["hf_config"] = hf
    d["language"].pop("seq_length")
    d["language"]["vocab_size"] = llama.hf_vocab_size(mc.language)
    d["language"].pop("unpadded_vocab_size")
    d["cross_attention"] = sorted(layer_indices(mc))
    for k in ("backend", "freeze_vision", "freeze_projector", "freeze_language"):
        d.pop(k)
    return d


class Mllama(Family):
    name = "mllama"
    hf_architectures = ("MllamaForConditionalGeneration",)
    arch = "cross_attention"

    def rename(self, key: str) -> str:
        return RENAME(key)

    def structure(self, mc: ModelConfig) -> dict:
        return structure(mc)

    def hf_model_class(self):
        from transformers import MllamaForConditionalGeneration

        return MllamaForConditionalGeneration

    # ---- config ---------------------------------------------------------------------------
    def model_config_from_hf(self, hf, folder=None, vocab_multiple: int = llama.DEFAULT_VOCAB_MULTIPLE):
        tc, vc = hf.text_config, hf.vision_config
        language = llama.language_config_from_hf(
            tc, vocab_multiple, tie_word_embeddings=bool(getattr(tc, "tie_word_embeddings", False)),
            model_types=("mllama_text_model",), embedding_rows=tc.vocab_size + EXTRA_EMBEDDING_ROWS)
        layers = list(getattr(tc, "cross_attention_layers", None) or [])
        if not layers:
            raise ConversionError("text_config.cross_attention_layers is empty: nothing to cross-attend with")
        vision_dict = vc.to_dict()
        for k in ("transformers_version", "architectures", "dtype", "torch_dtype", "_name_or_path"):
            vision_dict.pop(k, None)
        if [1, 1] not in [list(r) for r in vc.supported_aspect_ratios]:
            raise ConversionError("vision_config.supported_aspect_ratios lacks [1, 1]: single-tile "
                                  "images (our data contract) cannot be expressed")
        mean, std = read_image_stats(folder)
        kw = {}
        if mean is not None:
            kw["image_mean"] = tuple(float(x) for x in mean)
        if std is not None:
            kw["image_std"] = tuple(float(x) for x in std)
        vision = VisionConfig(num_layers=vc.num_hidden_layers, hidden_size=vc.hidden_size,
                              num_attention_heads=vc.attention_heads, ffn_hidden_size=vc.intermediate_size,
                              image_size=vc.image_size, patch_size=vc.patch_size, add_class_token=True,
                              layernorm_epsilon=vc.norm_eps, hf_config=vision_dict, **kw)
        image_token = getattr(hf, "image_token_index", None)
        if image_token is None:
            image_token = getattr(hf, "image_token_id", None)
        return ModelConfig(arch=self.arch, vision=[vision], language=language,
                           sections={"cross_attention": CrossAttentionConfig(layers=sorted(int(i) for i in layers))},
                           projector="affine", drop_vision_class_token=False, image_token_id=image_token)

    def hf_config_from_model(self, mc: ModelConfig, base: dict | None = None):
        from transformers import MllamaConfig, MllamaTextConfig

        if base is not None:
            return MllamaConfig.from_dict(base)
        if mc.vision_encoder.hf_config is None or mc.vision_encoder.hf_config.get("model_type") != "mllama_vision_model":
            raise ConversionError("model.vision.hf_config: an Mllama export needs the wrapped Mllama "
                                  "vision tower (model_type 'mllama_vision_model')")
        if mc.projector != "affine":
            raise ConversionError(f"model.projector={mc.projector!r}: Mllama's projector is 'affine'")
        lang = mc.language
        v = llama.hf_vocab_size(lang)
        text = MllamaTextConfig(
            vocab_size=v, hidden_size=lang.hidden_size, intermediate_size=lang.ffn_hidden_size,
            num_hidden_layers=lang.num_layers, num_attention_heads=lang.num_attention_heads,
            num_key_value_heads=lang.num_query_groups or lang.num_attention_heads,
            rms_norm_eps=lang.layernorm_epsilon, hidden_act=lang.activation,
            max_position_embeddings=lang.seq_length, cross_attention_layers=sorted(layer_indices(mc)),
            rope_parameters=llama.rope_parameters(lang),
            tie_word_embeddings=not lang.untie_embeddings_and_output_weights)
        if text.pad_token_id is not None and text.pad_token_id >= v + EXTRA_EMBEDDING_ROWS:
            text.pad_token_id = None  # Llama 3's default id; outside a smaller vocab it breaks nn.Embedding
        image_token = mc.image_token_id if mc.image_token_id is not None else v
        return MllamaConfig(vision_config=dict(mc.vision_encoder.hf_config), text_config=text.to_dict(),
                            image_token_index=image_token, architectures=list(self.hf_architectures))

    # ---- keys -----------------------------------------------------------------------------
    def pairs(self, mc: ModelConfig) -> list:
        if mc.vision_encoder.hf_config is None:
            raise ConversionError("model.vision.hf_config is not set: this cross_attention checkpoint uses "
                                  "our CLIP tower, which has no Mllama counterpart")
        vision = [Pair(f"vision_model.hf.{k}", (f"vision_model.{k}",)) for k in vision_keys(mc.vision_encoder.hf_config)]
        projector = expand([Rule("encoder.weight", "weight"), Rule("encoder.bias", "bias")],
                           mcore_prefix="vision_projection.", hf_prefix="multi_modal_projector.")
        return vision + projector + text_pairs(mc)

    # ---- verify / generate inputs -----------------------------------------------------------
    def sample_inputs(self, mc: ModelConfig, seed: int = 0, text_len: int = 12) -> ModelInputs:
        """``[<|image|>, text...]``, every token may attend the image (tile 0). Tiled configs
        (``model.vision.max_tiles = T > 1``): the image has the largest grid of fewer than T tiles
        (3 x 1 for T = 4), so real and padded tiles are both exercised.

        Rows that may attend no image are avoided on purpose: there HF attends all image tokens
        *including the padded tiles'* (its mask row is zeroed), which a single-tile model cannot
        reproduce; every row that sees an image agrees."""
        g = torch.Generator().manual_seed(seed)
        v = llama.hf_vocab_size(mc.language)
        image_token = mc.image_token_id if mc.image_token_id is not None else v
        text = torch.randint(0, v, (text_len,), generator=g)
        tokens = torch.cat([torch.tensor([image_token]), text])[None]
        size, t = mc.vision_encoder.image_size, mc.vision_encoder.max_tiles
        cam = torch.ones(1, tokens.shape[1], 1, dtype=torch.bool)
        if t == 1:
            return ModelInputs(tokens, images=torch.randn(1, 1, 3, size, size, generator=g),
                               image_mask=torch.ones(1, 1, dtype=torch.bool), text_image_mask=cam)
        from megatron_vlm.data.tiling import aspect_ratio_ids, supported_grids, tile_mask

        grid = torch.tensor([[max((g_ for g_ in supported_grids(t) if g_[0] * g_[1] < t),
                                  key=lambda g_: (g_[0] * g_[1], g_[0]))]])  # [1, 1, 2]
        mask = tile_mask(grid, t)
        images = torch.randn(1, 1, t, 3, size, size, generator=g) * mask[..., None, None, None]
        return ModelInputs(tokens, images=images, image_mask=torch.ones(1, 1, dtype=torch.bool),
                           text_image_mask=cam, aspect_ratio_ids=aspect_ratio_ids(grid, t),
                           aspect_ratio_mask=mask)

    def _hf_kwargs(self, hf_model, inputs: ModelInputs) -> dict:
        vc = hf_model.config.vision_config
        tiles = vc.max_num_tiles
        dtype = next(hf_model.parameters()).dtype
        b, s = inputs.tokens.shape
        if inputs.aspect_ratio_mask is not None:  # tiled: HF's processor outputs as they are
            mask = inputs.aspect_ratio_mask.long()
            cam = inputs.text_image_mask[..., None].long() * mask[:, None]  # [b, s, n, T]
            return dict(input_ids=inputs.tokens, pixel_values=inputs.images.to(dtype),
                        aspect_ratio_ids=inputs.aspect_ratio_ids, aspect_ratio_mask=mask,
                        cross_attention_mask=cam, attention_mask=torch.ones_like(inputs.tokens))
        images = inputs.images[:, 0].to(dtype)
        pixel_values = images.new_zeros(b, 1, tiles, *images.shape[1:])
        pixel_values[:, 0, 0] = images
        ratio_id = 1 + [list(r) for r in vc.supported_aspect_ratios].index([1, 1])
        device = inputs.tokens.device
        ratio_mask = torch.zeros(b, 1, tiles, dtype=torch.long, device=device)
        ratio_mask[..., 0] = 1
        cam = torch.zeros(b, s, 1, tiles, dtype=torch.long, device=device)
        cam[..., 0, 0] = inputs.text_image_mask[..., 0].long()
        return dict(input_ids=inputs.tokens, pixel_values=pixel_values,
                    aspect_ratio_ids=torch.full((b, 1), ratio_id, device=device), aspect_ratio_mask=ratio_mask,
                    cross_attention_mask=cam, attention_mask=torch.ones_like(inputs.tokens))

    def hf_logits(self, hf_model, inputs: ModelInputs) -> torch.Tensor:
        return hf_model(**self._hf_kwargs(hf_model, inputs)).logits

    def hf_generate(self, hf_model, inputs: ModelInputs, max_new_tokens: int) -> list[int]:
        kw = self._hf_kwargs(hf_model, inputs)
        out = hf_model.generate(**kw, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0)
        return out[0, inputs.tokens.shape[1]:].tolist()
