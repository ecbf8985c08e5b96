"""``LlavaForConditionalGeneration`` (CLIP vision + Llama) <-> our ``joint_decoder`` arch.

Map = CLIP tower (``clip.py``) + projector + Llama decoder (``llama.py``)::

    vision_model.*                                 vision_tower.*                      (clip.py)
    vision_projection.encoder.linear_fc1.{w,b}     multi_modal_projector.linear_1.{w,b}
    vision_projection.encoder.linear_fc2.{w,b}     multi_modal_projector.linear_2.{w,b}
    language_model.*                               language_model.model.* / language_model.lm_head

Config: ``vision_feature_layer`` (one int) decides how many CLIP layers our tower has (HF's
``hidden_states[k]`` = output of ``k`` layers, before ``post_layernorm``), ``'default'`` select
strategy = drop the class token, ``'full'`` = keep it; the projector must be LLaVA's 2-layer GELU
MLP with biases. The decoder's image-token positions hold ``image_token_index`` (HF expands one
image token into ``image_seq_length`` tokens the same way).
"""

from __future__ import annotations

import dataclasses

import torch

from megatron_vlm.config import ModelConfig
from megatron_vlm.conversion import clip, llama
from megatron_vlm.conversion.families import Family, prefix_renamer
from megatron_vlm.conversion.hf_io import read_image_stats
from megatron_vlm.data.batch import ModelInputs
from megatron_vlm.conversion.mapping import ConversionError, Rule, expand

RENAME = prefix_renamer([
    ("model.vision_tower.vision_model.", "vision_tower."),
    ("vision_tower.vision_model.", "vision_tower."),
    ("model.vision_tower.", "vision_tower."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("model.language_model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
])

PROJECTOR_RULES = [
    Rule(f"encoder.linear_fc{n}.{p}", f"linear_{n}.{p}") for n in (1, 2) for p in ("weight", "bias")
]


def structure(mc: ModelConfig) -> dict:
    """The fields that decide tensor layout and the forward function (not training choices)."""
    v, lang = dataclasses.asdict(mc.vision_encoder), dataclasses.asdict(mc.language)
    for k in ("image_mean", "image_std"):
        v.pop(k)
    lang.pop("seq_length")
    lang["vocab_size"] = llama.hf_vocab_size(mc.language)
    lang.pop("unpadded_vocab_size")
    return {"arch": mc.arch, "vision": v, "language": lang, "projector": mc.projector,
            "drop_vision_class_token": mc.drop_vision_class_token, "image_token_id": mc.image_token_id}


class Llava(Family):
    name = "llava"
    hf_architectures = ("LlavaForConditionalGeneration",)
    arch = "joint_decoder"

    def rename(self, key: str) -> str:
        return RENAME(key)

    def structure(self, mc: ModelConfig) -> dict:
        return structure(mc)

    def hf_model_class(self):
        from transformers import LlavaForConditionalGeneration

        return LlavaForConditionalGeneration

    # ---- config ---------------------------------------------------------------------------
    def model_config_from_hf(self, hf, folder=None, vocab_multiple: int = llama.DEFAULT_VOCAB_MULTIPLE):
        vc, tc = hf.vision_config, hf.text_config
        strategy = hf.vision_feature_select_strategy
        if strategy not in ("default", "full"):
            raise ConversionError(f"vision_feature_select_strategy={strategy!r}: allowed 'default', 'full'")
        if hf.projector_hidden_act != "gelu":
            raise ConversionError(f"projector_hidden_act={hf.projector_hidden_act!r}: our projector "
                                  f"(megatron MultimodalProjector 'mlp') uses exact GELU ('gelu') only")
        if not getattr(hf, "multimodal_projector_bias", True):
            raise ConversionError("multimodal_projector_bias=False: our projector has biases")
        k = clip.used_layers(vc.num_hidden_layers, hf.vision_feature_layer, "config")
        mean, std = read_image_stats(folder)
        vision = clip.vision_config_from_hf(vc, k, image_mean=mean, image_std=std)
        tie = getattr(hf, "tie_word_embeddings", None)
        tie = bool(tie) or bool(getattr(tc, "tie_word_embeddings", False))
        language = llama.language_config_from_hf(tc, vocab_multiple, tie_word_embeddings=tie)
        image_token = getattr(hf, "image_token_index", None)
        if image_token is None:
            image_token = getattr(hf, "image_token_id", None)
        if image_token is None or not 0 <= image_token < tc.vocab_size:
            raise ConversionError(f"image_token_index={image_token!r}: must be a token id < "
                                  f"text_config.vocab_size={tc.vocab_size}")
        mc = ModelConfig(arch=self.arch, vision=[vision], language=language, projector="mlp",
                         drop_vision_class_token=strategy == "default", image_token_id=image_token)
        if language.seq_length <= mc.num_image_tokens:
            language.seq_length = min(tc.max_position_embeddings, 2 * mc.num_image_tokens)
            if language.seq_length <= mc.num_image_tokens:
                raise ConversionError(f"text_config.max_position_embeddings={tc.max_position_embeddings}: "
                                      f"too short for {mc.num_image_tokens} image tokens")
        return mc

    def hf_config_from_model(self, mc: ModelConfig, base: dict | None = None):
        from transformers import LlavaConfig

        if base is not None:
            return LlavaConfig.from_dict(base)
        hf_vocab = llama.hf_vocab_size(mc.language)
        image_token = mc.image_token_id if mc.image_token_id is not None else mc.language.vocab_size - 1
        if image_token >= hf_vocab:
            raise ConversionError(f"model.image_token_id={image_token}: outside the exported vocab of {hf_vocab}")
        text = llama.language_config_to_hf(mc.language)
        vision = clip.vision_config_to_hf(mc.vision_encoder)
        return LlavaConfig(
            vision_config=vision.to_dict(), text_config=text.to_dict(), image_token_index=image_token,
            vision_feature_layer=-1,
            vision_feature_select_strategy="default" if mc.drop_vision_class_token else "full",
            projector_hidden_act="gelu", multimodal_projector_bias=True,
            image_seq_length=mc.num_image_tokens,
            tie_word_embeddings=not mc.language.untie_embeddings_and_output_weights,
            architectures=list(self.hf_architectures))

    # ---- keys -----------------------------------------------------------------------------
    def pairs(self, mc: ModelConfig) -> list:
        if mc.projector != "mlp":
            raise ConversionError(f"model.projector={mc.projector!r}: LLaVA's projector is the 'mlp' type")
        return (clip.pairs(mc.vision_encoder, "vision_model.", "vision_tower.")
                + expand(PROJECTOR_RULES, mcore_prefix="vision_projection.", hf_prefix="multi_modal_projector.")
                + llama.pairs(mc.language, "language_model.", "language_model.model.",
                              "language_model.lm_head.weight"))

    def fill_unused(self, key: str, hf):
        h = hf.vision_config.hidden_size
        if key == "vision_tower.post_layernorm.weight":
            return torch.ones(h)
        if key == "vision_tower.post_layernorm.bias":
            return torch.zeros(h)
        return None

    def unused_hf_keys(self, hf, mc: ModelConfig) -> list[str]:
        return clip.unused_keys(hf.vision_config.num_hidden_layers, mc.vision_encoder.num_layers, "vision_tower.")

    # ---- verify / generate inputs -----------------------------------------------------------
    def sample_inputs(self, mc: ModelConfig, seed: int = 0, text_len: int = 12) -> ModelInputs:
        """``[t0] + image tokens (one image) + text``: the expanded form both sides expect."""
        g = torch.Generator().manual_seed(seed)
        vocab = llama.hf_vocab_size(mc.language)
        image_token = mc.image_token_id if mc.image_token_id is not None else mc.language.vocab_size - 1
        text = torch.randint(0, vocab, (text_len,), generator=g)
        text[text == image_token] = (image_token + 1) % vocab
        tokens = torch.cat([text[:1], torch.full((mc.num_image_tokens,), image_token), text[1:]])
        size = mc.vision_encoder.image_size
        return ModelInputs(tokens[None], images=torch.randn(1, 1, 3, size, size, generator=g),
                           image_mask=torch.ones(1, 1, dtype=torch.bool))

    def _hf_kwargs(self, hf_model, inputs: ModelInputs) -> dict:
        dtype = next(hf_model.parameters()).dtype
        return dict(input_ids=inputs.tokens, pixel_values=inputs.images[:, 0].to(dtype),
                    attention_mask=torch.ones_like(inputs.tokens))

    def hf_logits(self, hf_model, inputs: ModelInputs) -> torch.Tensor:
        return hf_model(**self._hf_kwargs(hf_model, inputs)).logits

    def hf_generate(self, hf_model, inputs: ModelInputs, max_new_tokens: int) -> list[int]:
        out = hf_model.generate(**self._hf_kwargs(hf_model, inputs), max_new_tokens=max_new_tokens,
                                do_sample=False, pad_token_id=0)
        return out[0, inputs.tokens.shape[1]:].tolist()
