"""``VLMModel``: vision encoder -> projector -> language decoder, on megatron-core modules.

Arch subclasses (registered with :func:`register_arch`) decide how image features enter the
language decoder: ``build_language_model`` and ``language_forward``.

Submodules and state-dict prefixes::

    vision_model.*        megatron CLIPViTModel (class_token, conv1, position_embeddings, ln_pre,
                          decoder.layers.N.*)                        first pipeline stage only
    vision_projection.*   megatron MultimodalProjector (encoder.linear_fc1/fc2)   first stage only
    language_model.*      megatron GPTModel (embedding.word_embeddings, decoder.layers.N.*,
                          decoder.final_layernorm, output_layer)    split by pipeline stage

Pipeline parallel: the vision encoder and projector live on the first stage (virtual stage 0).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.activations import quick_gelu
from megatron.core.models.gpt import GPTModel
from megatron.core.models.vision.clip_vit_model import CLIPViTModel
from megatron.core.models.vision.multimodal_projector import MultimodalProjector
from megatron.core.transformer.enums import ModelType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_vlm.config import Config, ModelConfig, ParallelConfig
from megatron_vlm.models import specs

ARCHS: dict[str, type["VLMModel"]] = {}


def register_arch(name: str) -> Callable[[type], type]:
    def wrap(cls):
        ARCHS[name] = cls
        cls.arch_name = name
        return cls

    return wrap


def _common_config(parallel: ParallelConfig, dtype: torch.dtype, fp8: str | None = None,
                   fp8_recipe: str = "delayed") -> dict:
    return dict(
        fp8=fp8,
        fp8_recipe=fp8_recipe,
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline_model_parallel_size,
        expert_model_parallel_size=parallel.expert_model_parallel_size,
        context_parallel_size=parallel.context_parallel_size,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        use_cpu_initialization=not torch.cuda.is_available(),
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
    )


def language_transformer_config(cfg: ModelConfig, parallel: ParallelConfig,
                                dtype: torch.dtype = torch.float32, fp8: str | None = None,
                                fp8_recipe: str = "delayed", **overrides) -> TransformerConfig:
    """Llama-style decoder: RMSNorm, SwiGLU, no biases, RoPE (set on the GPTModel)."""
    lang = cfg.language
    kw = _common_config(parallel, dtype, fp8, fp8_recipe)
    kw.update(
        num_layers=lang.num_layers,
        hidden_size=lang.hidden_size,
        num_attention_heads=lang.num_attention_heads,
        num_query_groups=lang.num_query_groups or lang.num_attention_heads,
        ffn_hidden_size=lang.ffn_hidden_size,
        normalization="RMSNorm",
        layernorm_epsilon=lang.layernorm_epsilon,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        sequence_parallel=parallel.sequence_parallel,
    )
    kw.update(overrides)
    return TransformerConfig(**kw)


def vision_transformer_config(cfg: ModelConfig, parallel: ParallelConfig,
                              dtype: torch.dtype = torch.float32, fp8: str | None = None,
                              fp8_recipe: str = "delayed") -> TransformerConfig:
    """CLIP-style ViT: LayerNorm, quick-GELU MLP with biases. Never pipeline-split (first stage)."""
    v = cfg.vision
    kw = _common_config(parallel, dtype, fp8, fp8_recipe)
    kw.update(
        num_layers=v.num_layers,
        hidden_size=v.hidden_size,
        num_attention_heads=v.num_attention_heads,
        ffn_hidden_size=v.ffn_hidden_size,
        normalization="LayerNorm",
        layernorm_epsilon=v.layernorm_epsilon,
        activation_func=quick_gelu,
        add_bias_linear=True,
        add_qkv_bias=True,
        pipeline_model_parallel_size=1,
        virtual_pipeline_model_parallel_size=None,
        sequence_parallel=False,
    )
    return TransformerConfig(**kw)


def projector_transformer_config(cfg: ModelConfig, parallel: ParallelConfig,
                                 dtype: torch.dtype = torch.float32) -> TransformerConfig:
    """Two-layer GELU MLP vision_hidden -> lm_hidden -> lm_hidden (LLaVA's projector)."""
    kw = _common_config(parallel, dtype)
    kw.update(
        num_layers=1,
        hidden_size=cfg.language.hidden_size,
        num_attention_heads=cfg.language.num_attention_heads,  # unused; must divide by TP
        ffn_hidden_size=cfg.language.hidden_size,
        activation_func=F.gelu,
        add_bias_linear=True,
        gated_linear_unit=False,
        pipeline_model_parallel_size=1,
        virtual_pipeline_model_parallel_size=None,
        sequence_parallel=False,
    )
    return TransformerConfig(**kw)


class VLMModel(MegatronModule):
    """Vision encoder -> projector -> language decoder.

    ``forward(tokens, position_ids, images, image_mask, labels=None, ...)`` with tokens ``[b, s]``
    and images ``[b, n, 3, H, W]`` returns the per-token loss ``[b, s]`` when ``labels`` is given
    (last stage), logits ``[b, s, vocab/tp]`` without labels, or the hidden states
    ``[s, b, h]`` on a non-last pipeline stage.
    """

    arch_name = "base"

    def __init__(self, cfg: ModelConfig, parallel: ParallelConfig, *, pre_process: bool = True,
                 post_process: bool = True, vp_stage: int | None = None,
                 dtype: torch.dtype = torch.float32, image_token_id: int | None = None,
                 fp8: str | None = None, fp8_recipe: str = "delayed"):
        self.backend = specs.resolve_backend(cfg.backend)
        if fp8 and self.backend != "te":
            raise ValueError(f"fp8_format={fp8!r} needs the 'te' backend (Transformer Engine on a GPU)")
        self.language_config = language_transformer_config(cfg, parallel, dtype, fp8, fp8_recipe)
        super().__init__(config=self.language_config)
        self.cfg = cfg
        self.parallel = parallel
        self.pre_process = pre_process
        self.post_process = post_process
        self.vp_stage = vp_stage
        self.model_type = ModelType.encoder_or_decoder
        self.image_token_id = (image_token_id if image_token_id is not None
                               else cfg.image_token_id if cfg.image_token_id is not None
                               else cfg.language.vocab_size - 1)
        self.add_encoder = pre_process and (vp_stage is None or vp_stage == 0)

        self.vision_model = None
        self.vision_projection = None
        if self.add_encoder:
            v = cfg.vision
            if v.hf_config is not None:  # a transformers vision tower, used as is (e.g. Mllama's)
                from megatron_vlm.models.hf_vision import build_hf_vision_encoder

                self.vision_model = build_hf_vision_encoder(v.hf_config, dtype)
            else:
                vision_config = vision_transformer_config(cfg, parallel, dtype, fp8, fp8_recipe)
                norm = specs.norm_module(self.backend)
                self.vision_model = CLIPViTModel(
                    vision_config, specs.vision_layer_spec(self.backend), ln_pre_impl=norm,
                    ln_post_impl=norm, add_class_token=v.add_class_token, class_token_len=1,
                    patch_dim=v.patch_size, img_h=v.image_size, img_w=v.image_size)
            self.vision_projection = MultimodalProjector(
                projector_transformer_config(cfg, parallel, dtype),
                specs.projector_submodules(self.backend), cfg.projector,
                getattr(self.vision_model, "output_size", v.hidden_size))
            if cfg.projector == "affine" and hasattr(self.vision_projection.encoder, "skip_bias_add"):
                # megatron's affine projector gathers the TP output but then adds the rank's bias
                # shard (shape error at TP > 1): add the bias before the gather instead
                self.vision_projection.encoder.skip_bias_add = False
        self.language_model = self.build_language_model()
        self.freeze(vision=cfg.freeze_vision, projector=cfg.freeze_projector,
                    language=cfg.freeze_language)

    # ---- arch hooks ---------------------------------------------------------------------------
    def build_language_model(self) -> MegatronModule:
        return self.gpt_model(specs.block_spec(self.language_config, specs.language_layer_spec(self.backend),
                                               self.backend, self.vp_stage))

    def gpt_model(self, block_spec) -> GPTModel:
        """megatron-core's GPTModel of the language config with this stage's layer ``block_spec``."""
        return GPTModel(
            config=self.language_config,
            transformer_layer_spec=block_spec,
            vocab_size=self.cfg.language.vocab_size,
            max_sequence_length=self.cfg.language.seq_length,
            pre_process=self.pre_process,
            post_process=self.post_process,
            share_embeddings_and_output_weights=not self.cfg.language.untie_embeddings_and_output_weights,
            position_embedding_type="rope",
            rotary_base=int(self.cfg.language.rotary_base),
            rope_scaling=self.cfg.language.rope_scaling_factor is not None,
            rope_scaling_factor=self.cfg.language.rope_scaling_factor or 8.0,
            vp_stage=self.vp_stage,
        )

    def language_forward(self, tokens, position_ids, image_embeddings, image_mask, labels,
                         text_image_mask, **kwargs):
        raise NotImplementedError

    # ---- shared pieces ------------------------------------------------------------------------
    def freeze(self, vision: bool = False, projector: bool = False, language: bool = False) -> None:
        """Stop gradients of the vision encoder / projector / language model (LLaVA stage 1:
        vision + language frozen, projector trained)."""
        modules = ([self.vision_model] if vision else []) + (
            [self.vision_projection] if projector else []) + ([self.language_model] if language else [])
        for module in modules:
            if module is not None:
                for p in module.parameters():
                    p.requires_grad_(False)

    @property
    def share_embeddings_and_output_weights(self) -> bool:
        """Read by megatron's ``finalize_model_grads`` (tied embeddings across pipeline stages)."""
        return self.language_model.share_embeddings_and_output_weights

    def shared_embedding_or_output_weight(self):
        return self.language_model.shared_embedding_or_output_weight()

    def set_input_tensor(self, input_tensor) -> None:
        """Pipeline stages after the first receive the previous stage's hidden states here."""
        if isinstance(input_tensor, (list, tuple)):
            input_tensor = input_tensor[0]
        self.language_model.set_input_tensor(input_tensor)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """images ``[b, n, 3, H, W]`` -> projected features ``[b, n, k, h_lm]`` (k tokens per image)."""
        b, n = images.shape[:2]
        images = images.to(next(self.vision_model.parameters()).dtype)
        feats = self.vision_model(images.reshape(b * n, *images.shape[2:]))  # [b*n, s_v, h_v]
        if self.cfg.vision.add_class_token and self.cfg.drop_vision_class_token:
            feats = feats[:, 1:]
        feats = self.vision_projection(feats.transpose(0, 1).contiguous())  # [k, b*n, h_lm]
        return feats.transpose(0, 1).reshape(b, n, -1, feats.shape[-1])

    def forward(self, tokens: torch.Tensor, position_ids: torch.Tensor,
                images: torch.Tensor | None = None, image_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, text_image_mask: torch.Tensor | None = None,
                **kwargs):
        image_embeddings = None
        if self.add_encoder and images is not None:
            image_embeddings = self.encode_images(images)
        out = self.language_forward(tokens, position_ids, image_embeddings, image_mask, labels,
                                    text_image_mask, **kwargs)
        if not self.post_process:  # hidden states go to the next stage: p2p needs contiguous memory
            out = out.contiguous()
        return out


def build_model(cfg: Config, *, pre_process: bool | None = None, post_process: bool | None = None,
                vp_stage: int | None = None, dtype: torch.dtype | None = None,
                image_token_id: int | None = None) -> VLMModel:
    """The arch's model for this pipeline stage (stage flags default to megatron's parallel_state)."""
    import megatron_vlm.models  # noqa: F401  (registers the archs)

    name = cfg.model.arch
    if name not in ARCHS:
        raise ValueError(f"model.arch={name!r}: implemented archs are {sorted(ARCHS)}")
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
    if dtype is None:
        dtype = torch.bfloat16 if cfg.training.bf16 else torch.float32
    return ARCHS[name](cfg.model, cfg.parallel, pre_process=pre_process, post_process=post_process,
                       vp_stage=vp_stage, dtype=dtype, image_token_id=image_token_id,
                       fp8=cfg.training.fp8_format, fp8_recipe=cfg.training.fp8_recipe)

