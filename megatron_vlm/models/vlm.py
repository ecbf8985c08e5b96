"""``VLMModel``: vision encoder -> projector -> language decoder, on megatron-core modules.

Arch subclasses (one per arch package, ``megatron_vlm/archs/<name>/``) decide how image features
enter the language decoder (``language_forward``); their layer specs come from their ``ArchSpec``.

``forward(inputs: ModelInputs)`` is the one model-input contract (``megatron_vlm.data.batch``):
the schedule's ``forward_step``, eval, generation and ``verify`` all call it. On the way the model
builds the modality context ``[b, s(/tp), M]`` and hands it to megatron's ``GPTModel`` as its
per-forward ``padding_mask`` (see ``megatron_vlm.data.batch``): every decoder layer and the MLP/MoE
slot receive it, sequence-parallel sharded like the hidden states.

Submodules and state-dict prefixes::

    vision_model.*        megatron CLIPViTModel (class_token, conv1, position_embeddings, ln_pre,
                          decoder.layers.N.*)                        first pipeline stage only
    vision_projection.*   megatron MultimodalProjector (encoder.linear_fc1/fc2)   first stage only
    language_model.*      megatron GPTModel (embedding.word_embeddings, decoder.layers.N.*,
                          decoder.final_layernorm, output_layer)    split by pipeline stage

Several encoders (``model.vision`` a list; ``megatron_vlm/models/fusion.py``)::

    vision_models.<name>.*        each encoder (as vision_model.* above), keyed by its name
    vision_projections.<name>.*   fusion.space=projected: each encoder's projector (its width -> language)
    vision_projection.*           fusion.space=vision: one projector after the fusion
    fusion.*                      router / cross-attention / gate

Pipeline parallel: the vision encoder(s), fusion and projector(s) live on the first stage
(virtual stage 0).
"""

from __future__ import annotations

import contextlib

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

from megatron_vlm.archs import ArchSpec, BlockSpecContext, get_arch
from megatron_vlm.config import Config, ModelConfig, ParallelConfig, VisionConfig, recompute_modules
from megatron_vlm.data.batch import IMAGE_MODALITY, TEXT_MODALITY, ModelInputs, modality_context
from megatron_vlm.data.layout import TokenLayout
from megatron_vlm.models import specs
from megatron_vlm.models.backends import backend_provider
from megatron_vlm.models.fusion import Fusion, ModuleDictWithShards, fusion_width
from megatron_vlm.models.vocab import install_padded_vocab_mask


def _no_hf_init():
    """transformers' context that skips weight initialisation (the weights are loaded next)."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4.x
        from transformers.modeling_utils import no_init_weights
    return no_init_weights()


_on_host = False  # built_on_host()


@contextlib.contextmanager
def built_on_host():
    """Models built inside allocate their parameters in host memory also where CUDA is present
    (megatron's ``use_cpu_initialization``). For conversion: it fills and writes one parameter at a
    time, and host pages of parameters not yet filled cost nothing, where GPU allocations would hold
    the whole model on the device at once."""
    global _on_host
    before, _on_host = _on_host, True
    try:
        yield
    finally:
        _on_host = before


def _common_config(parallel: ParallelConfig, dtype: torch.dtype, fp8: str | None = None,
                   fp8_recipe: str = "delayed", calculate_per_token_loss: bool = False) -> dict:
    return dict(
        calculate_per_token_loss=calculate_per_token_loss,
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
        use_cpu_initialization=_on_host or not torch.cuda.is_available(),
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
    )


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """Tanh-approximated GELU (HF ``gelu_pytorch_tanh``; ``gelu_new`` is the same formula)."""
    return F.gelu(x, approximate="tanh")


GATED_ACTIVATION_FUNCTIONS = {"silu": F.silu, "gelu": F.gelu, "gelu_pytorch_tanh": gelu_tanh, "gelu_new": gelu_tanh}


def gated_activation(name: str):
    """The torch function of a gated-MLP activation name (``config.GATED_ACTIVATIONS``): megatron-core's
    MLP with ``gated_linear_unit=True`` computes ``act(x W_gate) * (x W_up)``."""
    if name not in GATED_ACTIVATION_FUNCTIONS:
        raise ValueError(f"model.language.activation={name!r}: allowed {list(GATED_ACTIVATION_FUNCTIONS)}")
    return GATED_ACTIVATION_FUNCTIONS[name]


def language_transformer_config(cfg: ModelConfig, parallel: ParallelConfig,
                                dtype: torch.dtype = torch.float32, fp8: str | None = None,
                                fp8_recipe: str = "delayed", calculate_per_token_loss: bool = False,
                                **overrides) -> TransformerConfig:
    """Llama-style decoder: RMSNorm, gated MLP (SwiGLU or GeGLU: ``language.activation``), no
    biases, RoPE (set on the GPTModel); ``overrides``
    are the arch's own fields (``ArchSpec.transformer_config``)."""
    lang = cfg.language
    kw = _common_config(parallel, dtype, fp8, fp8_recipe, calculate_per_token_loss)
    kw.update(
        hidden_dropout=lang.hidden_dropout,
        attention_dropout=lang.attention_dropout,
        num_layers=lang.num_layers,
        hidden_size=lang.hidden_size,
        num_attention_heads=lang.num_attention_heads,
        num_query_groups=lang.num_query_groups or lang.num_attention_heads,
        ffn_hidden_size=lang.ffn_hidden_size,
        normalization="RMSNorm",
        layernorm_epsilon=lang.layernorm_epsilon,
        gated_linear_unit=True,
        activation_func=gated_activation(lang.activation),
        add_bias_linear=False,
        sequence_parallel=parallel.sequence_parallel,
    )
    kw.update(overrides)
    return TransformerConfig(**kw)


def vision_transformer_config(v: VisionConfig, parallel: ParallelConfig,
                              dtype: torch.dtype = torch.float32, fp8: str | None = None,
                              fp8_recipe: str = "delayed", **overrides) -> TransformerConfig:
    """CLIP-style ViT: LayerNorm, quick-GELU MLP with biases. Never pipeline-split (first stage)."""
    kw = _common_config(parallel, dtype, fp8, fp8_recipe)
    kw.update(
        hidden_dropout=v.hidden_dropout,
        attention_dropout=v.attention_dropout,
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
        expert_model_parallel_size=1,  # no experts here (megatron refuses EP > 1 without them)
        sequence_parallel=False,
    )
    kw.update(overrides)
    return TransformerConfig(**kw)


def projector_transformer_config(cfg: ModelConfig, parallel: ParallelConfig,
                                 dtype: torch.dtype = torch.float32, **overrides) -> TransformerConfig:
    """Two-layer GELU MLP vision_hidden -> lm_hidden -> lm_hidden (LLaVA's projector)."""
    kw = _common_config(parallel, dtype)
    kw.update(
        num_layers=1,
        hidden_size=cfg.language.hidden_size,
        num_attention_heads=cfg.language.num_attention_heads,  # unused; must divide by TP
        ffn_hidden_size=cfg.language.hidden_size,
        activation_func=F.gelu,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        add_bias_linear=True,
        gated_linear_unit=False,
        pipeline_model_parallel_size=1,
        virtual_pipeline_model_parallel_size=None,
        expert_model_parallel_size=1,  # no experts here (megatron refuses EP > 1 without them)
        sequence_parallel=False,
    )
    kw.update(overrides)
    return TransformerConfig(**kw)


def fusion_transformer_config(cfg: ModelConfig, parallel: ParallelConfig,
                              dtype: torch.dtype = torch.float32, **overrides) -> TransformerConfig:
    """The fusion's width (``fusion.fusion_width``) and ``fusion.heads`` heads (cross_attn's
    tensor-parallel linears); replicated otherwise, never pipeline-split."""
    width = fusion_width(cfg)
    # heads: cross_attn's; otherwise unused (megatron only asks that TP divides them)
    heads = cfg.fusion.heads if cfg.fusion.method == "cross_attn" else parallel.tensor_model_parallel_size
    return projector_transformer_config(cfg, parallel, dtype, hidden_size=width, num_attention_heads=heads,
                                        ffn_hidden_size=width, **overrides)


def recompute_fields(t) -> dict:
    """The language decoder's activation-recompute fields of megatron's TransformerConfig."""
    if t.recompute_granularity is None:
        return {}
    if t.recompute_granularity == "full":
        return dict(recompute_granularity="full", recompute_method=t.recompute_method or "uniform",
                    recompute_num_layers=t.recompute_num_layers or 1)
    return dict(recompute_granularity="selective", recompute_modules=recompute_modules(t))


class VLMModel(MegatronModule):
    """Vision encoder -> projector -> language decoder.

    ``forward(inputs: ModelInputs, inference_context=None, runtime_gather_output=None)`` with
    ``inputs.tokens`` ``[b, s]`` and ``inputs.images`` ``[b, n, 3, H, W]`` (tiled Mllama:
    ``[b, n, T, 3, H, W]`` + ``aspect_ratio_ids``/``aspect_ratio_mask``; several encoders: a tuple,
    see ``encode_images``) returns the per-token loss
    ``[b, s]`` when ``inputs.labels`` is given (last stage), logits ``[b, s, vocab/tp]`` without
    labels, or the hidden states ``[s(/tp), b, h]`` on a non-last pipeline stage.
    """

    arch: ArchSpec

    def __init__(self, cfg: Config, *, pre_process: bool = True, post_process: bool = True,
                 vp_stage: int | None = None, dtype: torch.dtype = torch.float32,
                 image_token_id: int | None = None, init_weights: bool = True):
        mc, parallel, t = cfg.model, cfg.parallel, cfg.training
        init = {} if init_weights else {"perform_initialization": False}
        self.arch = get_arch(mc.arch)
        self.backend_provider = backend_provider(mc.backend)
        self.backend = self.backend_provider.name
        self.language_config = language_transformer_config(
            mc, parallel, dtype, t.fp8_format, t.fp8_recipe, t.calculate_per_token_loss,
            **recompute_fields(t), **self.arch.transformer_config(mc), **init)
        super().__init__(config=self.language_config)
        self.cfg = mc
        self.cfg_training = t
        self.parallel = parallel
        self.images_per_sample = cfg.data.images_per_sample
        self.pre_process = pre_process
        self.post_process = post_process
        self.vp_stage = vp_stage
        self.model_type = ModelType.encoder_or_decoder
        self.image_token_id = (image_token_id if image_token_id is not None
                               else mc.image_token_id if mc.image_token_id is not None
                               else mc.language.vocab_size - 1)
        self.add_encoder = pre_process and (vp_stage is None or vp_stage == 0)

        self.vision_model = None
        self.vision_projection = None
        self.vision_models = self.vision_projections = self.fusion = None  # several encoders
        if self.add_encoder and not mc.multi_encoder:
            v = mc.vision_encoder
            self.vision_model = self._build_encoder(v, dtype, init_weights, init)
            self.vision_projection = self._build_projector(
                getattr(self.vision_model, "output_size", v.hidden_size), dtype, init)
        elif self.add_encoder:
            self.vision_models = ModuleDictWithShards(
                {v.name: self._build_encoder(v, dtype, init_weights, init) for v in mc.vision})
            if mc.fusion.space == "projected":
                self.vision_projections = ModuleDictWithShards({v.name: self._build_projector(
                    getattr(self.vision_models[v.name], "output_size", v.hidden_size), dtype, init) for v in mc.vision})
            else:
                self.vision_projection = self._build_projector(fusion_width(mc), dtype, init)
            self.fusion = Fusion(mc, fusion_transformer_config(mc, parallel, dtype, **init))
        self.language_model = self.build_language_model()
        install_padded_vocab_mask(self.language_model, mc.language)  # padded ids: out of the softmax
        self.freeze()

    def _build_encoder(self, v: VisionConfig, dtype: torch.dtype, init_weights: bool, init: dict):
        """Encoder ``v``: megatron's CLIPViTModel, or a wrapped transformers tower (``hf_config``)."""
        if v.hf_config is not None:  # a transformers vision tower, used as is (e.g. Mllama's)
            from megatron_vlm.models.hf_vision import build_hf_vision_encoder

            with contextlib.nullcontext() if init_weights else _no_hf_init():
                return build_hf_vision_encoder(v.hf_config, dtype)
        t, norm = self.cfg_training, self.backend_provider.layer_norm()
        return CLIPViTModel(
            vision_transformer_config(v, self.parallel, dtype, t.fp8_format, t.fp8_recipe, **init),
            specs.vision_layer_spec(self.backend_provider), ln_pre_impl=norm,
            ln_post_impl=norm, add_class_token=v.add_class_token, class_token_len=1,
            # the conv stem floors the grid; megatron asserts a multiple, so give it the
            # covered size (the images themselves stay image_size px)
            patch_dim=v.patch_size, img_h=v.patches_per_side * v.patch_size,
            img_w=v.patches_per_side * v.patch_size)

    def _build_projector(self, input_size: int, dtype: torch.dtype, init: dict) -> MultimodalProjector:
        """megatron's MultimodalProjector ``input_size`` -> language width (``model.projector``)."""
        mc = self.cfg
        projection = MultimodalProjector(projector_transformer_config(mc, self.parallel, dtype, **init),
                                         specs.projector_submodules(self.backend_provider), mc.projector,
                                         input_size)
        if mc.projector == "affine" and hasattr(projection.encoder, "skip_bias_add"):
            # megatron's affine projector gathers the TP output but then adds the rank's bias
            # shard (shape error at TP > 1): add the bias before the gather instead
            projection.encoder.skip_bias_add = False
        return projection

    # ---- construction -------------------------------------------------------------------------
    def build_language_model(self) -> MegatronModule:
        """megatron-core's GPTModel with this stage's layers from the arch's ``block_spec``."""
        block = self.arch.build_block_spec(BlockSpecContext(self.cfg, self.language_config,
                                                            self.backend_provider, self.vp_stage))
        return GPTModel(
            config=self.language_config,
            transformer_layer_spec=block,
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

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        metadata = dict(metadata or {}, **self.arch.checkpoint_metadata())
        return super().sharded_state_dict(prefix, sharded_offsets, metadata)

    # ---- arch hook ----------------------------------------------------------------------------
    def language_forward(self, inputs: ModelInputs, decoder_input, image_embeddings, context,
                         inference_context=None, runtime_gather_output=None):
        """The arch's decoder pass. ``decoder_input``: the token embeddings ``[s(/tp), b, h]``
        (first stage; None elsewhere); ``image_embeddings`` ``[b, n, k, h]`` or None; ``context``:
        the modality context for ``GPTModel(..., padding_mask=context)``."""
        raise NotImplementedError

    # ---- shared pieces ------------------------------------------------------------------------
    def freeze(self) -> None:
        """Stop gradients of what the config freezes (LLaVA stage 1: vision + language frozen,
        projector trained): each encoder per ``ModelConfig.encoder_frozen``; the projectors and the
        fusion per ``freeze_projector``; the language model per ``freeze_language``."""
        mc = self.cfg
        frozen = [v.name for v in mc.vision if mc.encoder_frozen(v)]
        modules = ([self.vision_model] if frozen and self.vision_models is None else []) + (
            [self.vision_projection, self.vision_projections, self.fusion] if mc.freeze_projector else []) + (
            [self.language_model] if mc.freeze_language else [])
        if self.vision_models is not None:
            modules += [self.vision_models[name] for name in frozen]
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

    def encode_images(self, images, aspect_ratio_ids: torch.Tensor | None = None,
                      aspect_ratio_mask: torch.Tensor | None = None,
                      router_weights: torch.Tensor | None = None) -> torch.Tensor:
        """images ``[b, n, 3, H, W]`` -> projected features ``[b, n, k, h_lm]`` (k tokens per image).
        Tiled (Mllama tower): images ``[b, n, T, 3, H, W]`` + ``aspect_ratio_ids`` ``[b, n]`` and
        ``aspect_ratio_mask`` ``[b, n, T]`` -> ``[b, n, T*k, h_lm]`` (tile-major).
        Several encoders: a tuple of E tensors ``[b, n, 3, H_e, W_e]`` (``model.vision`` order) and,
        for ``fusion.router: data``, ``router_weights`` ``[b, E]`` -> the fused ``[b, n, k, h_lm]``."""
        if self.fusion is None:
            b, n = images.shape[:2]
            feats = self._encoder_features(self.vision_model, self.cfg.vision_encoder, images,
                                           aspect_ratio_ids, aspect_ratio_mask)
            feats = self._project(self.vision_projection, feats)
            return feats.reshape(b, n, -1, feats.shape[-1])
        vision = self.cfg.vision
        if not isinstance(images, (tuple, list)) or len(images) != len(vision):
            got = f"a tuple of {len(images)}" if isinstance(images, (tuple, list)) else f"a {type(images).__name__}"
            raise ValueError(f"images: {got}; model.vision has {len(vision)} encoders: expected a tuple of "
                             f"{len(vision)} tensors [batch, images, 3, H, W] in model.vision order")
        b, n = images[0].shape[:2]
        tokens = []
        for v, x in zip(vision, images):
            feats = self._encoder_features(self.vision_models[v.name], v, x)  # [b*n, k_e, h_e]
            if self.vision_projections is not None:
                feats = self._project(self.vision_projections[v.name], feats)
            tokens.append(feats)
        if router_weights is not None:  # per sample -> per image
            router_weights = router_weights[:, None].expand(b, n, -1).reshape(b * n, -1)
        fused = self.fusion(tokens, router_weights)  # [b*n, k, d]
        if self.vision_projections is None:
            fused = self._project(self.vision_projection, fused)
        return fused.reshape(b, n, -1, fused.shape[-1])

    def _encoder_features(self, model, v: VisionConfig, images: torch.Tensor, aspect_ratio_ids=None,
                          aspect_ratio_mask=None) -> torch.Tensor:
        """``[b, n, (T,) 3, H, W]`` -> encoder features ``[b*n, (T*)k, h_v]`` (class token dropped
        when ``drop_vision_class_token``)."""
        b, n = images.shape[:2]
        images = images.to(next(model.parameters()).dtype)
        if images.dim() == 6:
            feats = model(images.reshape(b * n, *images.shape[2:]), aspect_ratio_ids.reshape(b * n),
                          aspect_ratio_mask.reshape(b * n, -1))  # [b*n, T, s_v, h_v]
        else:
            feats = model(images.reshape(b * n, *images.shape[2:]))  # [b*n, s_v, h_v]
        if v.add_class_token and self.cfg.drop_vision_class_token:
            feats = feats[..., 1:, :]
        return feats.reshape(b * n, -1, feats.shape[-1])

    @staticmethod
    def _project(projection, feats: torch.Tensor) -> torch.Tensor:
        """``[B, k, h_v]`` -> ``[B, k, h_lm]`` through a MultimodalProjector (sequence-first)."""
        return projection(feats.transpose(0, 1).contiguous()).transpose(0, 1)

    def modality_ids(self, inputs: ModelInputs) -> torch.Tensor:
        """``inputs.modality_ids``, or the arch's token layout's: image tokens are modality 0
        in the inline layout, every position is text in the marker layout."""
        if inputs.modality_ids is not None:
            return inputs.modality_ids
        if self.arch.token_layout is TokenLayout.INLINE:
            return torch.where(inputs.tokens == self.image_token_id, IMAGE_MODALITY, TEXT_MODALITY)
        return torch.full_like(inputs.tokens, TEXT_MODALITY)

    def modality_context(self, inputs: ModelInputs) -> torch.Tensor:
        """bool ``[b, s(/tp), M]`` (see ``megatron_vlm.data.batch``): this rank's slice of the
        sequence under sequence parallelism, like the hidden states it travels with."""
        ctx = modality_context(self.modality_ids(inputs), inputs.padding_mask)
        if self.language_config.sequence_parallel:
            tp = parallel_state.get_tensor_model_parallel_world_size()
            rank = parallel_state.get_tensor_model_parallel_rank()
            s_local = ctx.shape[1] // tp
            ctx = ctx[:, rank * s_local:(rank + 1) * s_local]
        return ctx.contiguous()

    def forward(self, inputs: ModelInputs, inference_context=None, runtime_gather_output=None):
        image_embeddings = None
        if self.add_encoder and inputs.images is not None:
            image_embeddings = self.encode_images(inputs.images, inputs.aspect_ratio_ids, inputs.aspect_ratio_mask,
                                                  inputs.router_weights)
        decoder_input = None
        if self.pre_process:
            decoder_input = self.language_model.embedding(input_ids=inputs.tokens,
                                                          position_ids=inputs.position_ids)
        out = self.language_forward(inputs, decoder_input, image_embeddings, self.modality_context(inputs),
                                    inference_context, runtime_gather_output)
        if not self.post_process:  # hidden states go to the next stage: p2p needs contiguous memory
            out = out.contiguous()
        return out


def build_model(cfg: Config, *, pre_process: bool | None = None, post_process: bool | None = None,
                vp_stage: int | None = None, dtype: torch.dtype | None = None,
                image_token_id: int | None = None, init_weights: bool = True) -> VLMModel:
    """The arch's model for this pipeline stage (stage flags default to megatron's parallel_state).
    ``init_weights=False``: parameters are allocated but not initialised (megatron's
    ``perform_initialization=False``, transformers' ``no_init_weights`` for wrapped HF towers), for
    callers that load every weight next (conversion, verify)."""
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
    if dtype is None:
        dtype = torch.bfloat16 if cfg.training.bf16 else torch.float32
    return get_arch(cfg.model.arch).model_cls()(cfg, pre_process=pre_process, post_process=post_process,
                                                vp_stage=vp_stage, dtype=dtype, image_token_id=image_token_id,
                                                init_weights=init_weights)
