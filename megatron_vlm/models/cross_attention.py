"""``cross_attention`` arch (Llama-3.2-Vision / Mllama layout): the residual stream carries text
only; projected image features enter as keys/values of gated cross-attention layers that sit in the
decoder's layer list between the self-attention layers.

Layout (Mllama's): ``language.num_layers`` counts ALL layers; cross-attention (CA) layers are
layers of their own at global indices given by ``model.cross_attention.layers`` (wins) or by
``every``: ``[i for i in range(num_layers) if i % (every + 1) == every - 1]``, i.e. a CA layer in
front of text layers ``every-1, 2*every-1, ...`` of the text-only stack, where HF's conversion of
Meta's checkpoints puts them: ``every=4`` with 40 layers -> [3, 8, 13, ..., 38]
(Llama-3.2-11B-Vision), with 100 layers -> [3, 8, ..., 98] (90B).

A CA layer (``GatedCrossAttentionLayer``, Mllama's ``MllamaCrossAttentionDecoderLayer``)::

    h   = x + tanh(attn_gate) * row * CrossAttn(input_layernorm(x), image)      # row: see below
    out = h + tanh(mlp_gate)  * row * MLP(pre_mlp_layernorm(h))

``CrossAttn``: Q from text (linear_q, per-head RMSNorm ``q_layernorm``), K/V from the image features
(fused ``linear_kv``, per-head RMSNorm ``k_layernorm`` on K), GQA with ``num_query_groups``, no RoPE,
no causal mask on the image axis, a padding mask from ``text_image_mask`` [b, s, n] and
``image_mask`` [b, n] (each image is k feature tokens). ``row`` is 1 for a text token that may
attend at least one image and 0 otherwise (Mllama's ``full_text_row_masked_out_mask``): text before
any image, a sample without images, only padded images -> the layer adds exactly 0 there.
Gates start at 0, so at step 0 the layer is the identity (bit for bit). With no image features at
all (``images=None``, empty cache) CA layers are skipped, as HF does.

HF detail: HF transformers 5.23 multiplies ``row`` into the MLP branch only; its attention branch
attends *all* image tokens on rows without an image (the mask row is zeroed, not -inf) and adds
``tanh(attn_gate) * that``. Meta's reference code (and this module by default) zero those rows.
``model.cross_attention.text_rows_without_image: hf`` (or ``set_text_rows_without_image("hf")``)
switches to HF's exact behaviour (used by the HF parity test); the two agree on every row that sees an image.

State dict of one CA layer at ``language_model.decoder.layers.{i}.`` (local backend; TP shards
along the first axis for column-parallel, the second for row-parallel, as megatron does)::

    input_layernorm.weight                 [h]                 HF input_layernorm.weight
    cross_attention.linear_q.weight        [nq d, h]           HF cross_attn.q_proj.weight
    cross_attention.linear_kv.weight       [2 ng d, h]         HF cross_attn.{k,v}_proj: rows per
                                                               query group g = [k_g (d); v_g (d)]
    cross_attention.q_layernorm.weight     [d]                 HF cross_attn.q_norm.weight
    cross_attention.k_layernorm.weight     [d]                 HF cross_attn.k_norm.weight
    cross_attention.linear_proj.weight     [h, nq d]           HF cross_attn.o_proj.weight
    cross_attn_attn_gate                   [1]                 HF cross_attn_attn_gate
    pre_mlp_layernorm.weight               [h]                 HF post_attention_layernorm.weight
    mlp.linear_fc1.weight                  [2 f, h]            HF cat(mlp.gate_proj, mlp.up_proj)
    mlp.linear_fc2.weight                  [h, f]              HF mlp.down_proj.weight
    cross_attn_mlp_gate                    [1]                 HF cross_attn_mlp_gate

te backend: ``input_layernorm.weight`` -> ``cross_attention.linear_q.layer_norm_weight`` and
``pre_mlp_layernorm.weight`` -> ``mlp.linear_fc1.layer_norm_weight`` (fused), plus TE
``_extra_state`` entries. The mapping from/to HF lives in :mod:`megatron_vlm.conversion.mllama_text`.
Checkpoints: layers are non-homogeneous; :meth:`CrossAttentionVLM.sharded_state_dict` always sets
``metadata["non_homogeneous_layers"] = True`` (callers should pass it too).

Pipeline parallel: layers are split across stages by global index (megatron's uniform split,
``get_transformer_layer_offset``). The vision encoder + projector live on the first stage; image
features travel to later stages *packed behind the text along the sequence axis*: every non-last
stage sends ``[s + n*k, b, h]`` (``[(s + n*k)/tp, b, h]`` with sequence parallelism, the image part
sharded along n*k as the K/V projection all-gathers it). megatron's p2p thus carries features
forward and their gradients back to the encoder. The schedule's ``seq_length`` must be
:meth:`CrossAttentionVLM.pipeline_seq_length` (``s + images_per_sample * k`` when PP > 1, else s).

Generation: pass a megatron ``StaticInferenceContext``; CA layers store their image K/V in
``inference_context.cross_attention_cache`` on the step that has images (prefill) and reuse them on
decoding steps without images.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.models.gpt import GPTModel
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from megatron_vlm.config import CA_TEXT_ROW_MODES
from megatron_vlm.models import specs
from megatron_vlm.models.attention import SDPAttention
from megatron_vlm.models.vlm import VLMModel, register_arch

TEXT_ROW_MODES = CA_TEXT_ROW_MODES


# ------------------------------------------------------------------------------------------------
# Placement
# ------------------------------------------------------------------------------------------------

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
                         f"places no cross-attention layer (the first sits at index {every - 1})")
    return idx


def text_layer_indices(num_layers: int, ca_indices: list[int]) -> list[int]:
    """Global indices of the self-attention layers: text-only decoder layer j sits at entry j."""
    ca = set(ca_indices)
    return [i for i in range(num_layers) if i not in ca]


# ------------------------------------------------------------------------------------------------
# Modules
# ------------------------------------------------------------------------------------------------

class HeadRMSNorm(torch.nn.Module):
    """RMSNorm over the head dim of ``[..., heads, d]`` (Mllama's q_norm/k_norm; fp32 inside).

    The weight is shared by all heads while heads are split over TP ranks: its gradient is summed
    over the TP group by autograd (``copy_to_tensor_model_parallel_region``), so it needs no
    ``sequence_parallel`` flag and no help from ``finalize_model_grads``.
    """

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **unused):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        if parallel_state.model_parallel_is_initialized() and \
                parallel_state.get_tensor_model_parallel_world_size() > 1 and torch.is_grad_enabled():
            weight = tensor_parallel.copy_to_tensor_model_parallel_region(weight)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return weight * xf.to(x.dtype)


@dataclass
class GQACrossAttentionSubmodules:
    linear_q: Union[ModuleSpec, type] = None
    linear_kv: Union[ModuleSpec, type] = None
    core_attention: Union[ModuleSpec, type] = None
    linear_proj: Union[ModuleSpec, type] = None
    q_layernorm: Union[ModuleSpec, type] = HeadRMSNorm
    k_layernorm: Union[ModuleSpec, type] = HeadRMSNorm


@dataclass
class CrossAttentionCache:
    """Image K/V per CA layer (``layer_number -> (k, v)``, each ``[n*k(/tp groups), b, ng/tp, d]``)
    and the last text row's image permission ``[b, n]`` (decoding steps reuse it, as HF generate
    repeats the last ``cross_attention_mask`` row)."""
    kv: dict = field(default_factory=dict)
    last_row: torch.Tensor | None = None
    tokens_per_image: int | None = None


def _cache_of(inference_context) -> CrossAttentionCache | None:
    if inference_context is None:
        return None
    cache = getattr(inference_context, "cross_attention_cache", None)
    if cache is None:
        cache = CrossAttentionCache()
        inference_context.cross_attention_cache = cache
    return cache


class GQACrossAttention(MegatronModule):
    """Text queries ``[s(/tp), b, h]`` attend image keys/values ``[n*k(/tp), b, h]`` (``/tp``: sequence
    parallel). Tensor-parallel over heads: linear_q and linear_kv are column-parallel (heads resp.
    query groups split), linear_proj row-parallel. ``attention_mask`` bool ``[b, 1, s, n*k]``, True =
    do not attend. Returns ``(output [s(/tp), b, h], bias or None)``."""

    def __init__(self, config: TransformerConfig, submodules: GQACrossAttentionSubmodules,
                 layer_number: int, pg_collection=None, **unused):
        super().__init__(config=config)
        if pg_collection is None:
            from megatron.core.process_groups_config import ProcessGroupCollection
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp", "cp"])
        self.pg_collection, self.tp_group = pg_collection, pg_collection.tp
        self.layer_number = layer_number
        tp = self.tp_group.size()
        heads, groups = config.num_attention_heads, config.num_query_groups
        if heads % tp or groups % tp:
            raise ValueError(f"cross-attention: heads={heads} and query groups={groups} must be divisible "
                             f"by tensor_model_parallel_size={tp}")
        self.head_dim = config.kv_channels
        self.heads_per_rank, self.groups_per_rank = heads // tp, groups // tp
        linear_kw = dict(config=config, init_method=config.init_method, gather_output=False,
                         bias=config.add_bias_linear, skip_bias_add=False, is_expert=False,
                         tp_group=self.tp_group)
        self.linear_q = build_module(submodules.linear_q, config.hidden_size, heads * self.head_dim,
                                     tp_comm_buffer_name="q", **linear_kw)
        self.linear_kv = build_module(submodules.linear_kv, config.hidden_size, 2 * groups * self.head_dim,
                                      tp_comm_buffer_name="kv", **linear_kw)
        self.q_layernorm = build_module(submodules.q_layernorm, config=config, hidden_size=self.head_dim,
                                        eps=config.layernorm_epsilon)
        self.k_layernorm = build_module(submodules.k_layernorm, config=config, hidden_size=self.head_dim,
                                        eps=config.layernorm_epsilon)
        self.core_attention = build_module(submodules.core_attention, config=config,
                                           layer_number=layer_number, attn_mask_type=AttnMaskType.arbitrary,
                                           attention_type="cross", pg_collection=pg_collection)
        self.linear_proj = build_module(submodules.linear_proj, heads * self.head_dim, config.hidden_size,
                                        config=config, init_method=config.output_layer_init_method,
                                        bias=config.add_bias_linear, input_is_parallel=True,
                                        skip_bias_add=True, is_expert=False, tp_comm_buffer_name="proj",
                                        tp_group=self.tp_group)

    def image_key_values(self, image_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[n*k(/tp), b, h]`` -> K (normed), V, each ``[n*k, b, ng/tp, d]``."""
        kv, _ = self.linear_kv(image_states)
        kv = kv.view(*kv.shape[:2], self.groups_per_rank, 2 * self.head_dim)
        key, value = kv[..., :self.head_dim], kv[..., self.head_dim:]
        return self.k_layernorm(key).contiguous(), value.contiguous()

    def forward(self, hidden_states, key_value_states=None, attention_mask=None,
                cache: CrossAttentionCache | None = None):
        query, _ = self.linear_q(hidden_states)
        query = query.view(*query.shape[:2], self.heads_per_rank, self.head_dim)
        query = self.q_layernorm(query).contiguous()
        if key_value_states is not None:
            key, value = self.image_key_values(key_value_states)
            if cache is not None:
                cache.kv[self.layer_number] = (key.detach(), value.detach())
        elif cache is not None and self.layer_number in cache.kv:
            key, value = cache.kv[self.layer_number]
        else:
            raise ValueError(f"cross-attention layer {self.layer_number}: no image features and no cached K/V")
        context = self.core_attention(query, key, value, attention_mask,
                                      attn_mask_type=AttnMaskType.arbitrary)
        return self.linear_proj(context)


class GatedCrossAttentionLayer(TransformerLayer):
    """Mllama's cross-attention decoder layer as a megatron TransformerLayer (tanh gates at 0).

    Called by ``TransformerBlock`` like any layer: ``context`` = image features ``[n*k(/tp), b, h]``
    or None, ``context_mask`` = bool ``[b, 1, s, n*k]`` (True = do not attend; a row that is all
    True is a text token without image). Returns ``(hidden_states, context)``.
    """

    def __init__(self, config: TransformerConfig, submodules: TransformerLayerSubmodules,
                 layer_number: int = 1, hidden_dropout: float | None = None, pg_collection=None,
                 vp_stage: int | None = None):
        super().__init__(config, submodules, layer_number, hidden_dropout, pg_collection, vp_stage)
        self.cross_attn_attn_gate = torch.nn.Parameter(torch.zeros(1, dtype=config.params_dtype))
        self.cross_attn_mlp_gate = torch.nn.Parameter(torch.zeros(1, dtype=config.params_dtype))
        for gate in (self.cross_attn_attn_gate, self.cross_attn_mlp_gate):
            # with SP each rank sees s/tp rows: finalize_model_grads sums the gate grads over TP
            setattr(gate, "sequence_parallel", config.sequence_parallel)
        self.text_rows_without_image = "zero"

    def _row_mask(self, context_mask, hidden_states):
        """(core-attention mask with image-less rows opened, row mask ``[s(/tp), b, 1]``)."""
        if context_mask is None:
            return None, None
        has_image = ~context_mask.all(dim=-1, keepdim=True)  # [b, 1, s, 1]
        attn_mask = context_mask & has_image  # rows without any image: attend all (no NaN), then zeroed
        row = has_image[:, 0, :, 0].t().unsqueeze(-1).to(hidden_states.dtype)  # [s, b, 1]
        if self.config.sequence_parallel:
            s_local = hidden_states.shape[0]
            rank = parallel_state.get_tensor_model_parallel_rank()
            row = row[rank * s_local:(rank + 1) * s_local]
        return attn_mask, row

    def forward(self, hidden_states, attention_mask=None, context=None, context_mask=None,
                inference_context=None, **unused):
        cache = _cache_of(inference_context)
        if context is None and (cache is None or self.layer_number not in cache.kv):
            return hidden_states, context  # no image features at all: skipped, as HF does
        attn_mask, row = self._row_mask(context_mask, hidden_states)
        attn, bias = self.cross_attention(self.input_layernorm(hidden_states), key_value_states=context,
                                          attention_mask=attn_mask, cache=cache)
        if bias is not None:
            attn = attn + bias
        if row is not None and self.text_rows_without_image == "zero":
            attn = attn * row
        attn = torch.nn.functional.dropout(attn, p=self.hidden_dropout, training=self.training)
        hidden_states = hidden_states + self.cross_attn_attn_gate.tanh() * attn

        mlp, bias = self.mlp(self.pre_mlp_layernorm(hidden_states))
        if bias is not None:
            mlp = mlp + bias
        if row is not None:
            mlp = mlp * row
        mlp = torch.nn.functional.dropout(mlp, p=self.hidden_dropout, training=self.training)
        return hidden_states + self.cross_attn_mlp_gate.tanh() * mlp, context


# ------------------------------------------------------------------------------------------------
# Specs
# ------------------------------------------------------------------------------------------------

CA_TE_NORM_KEYS = {"input_layernorm.": "cross_attention.linear_q.layer_norm_",
                   "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_"}


def cross_attention_layer_spec(backend: str) -> ModuleSpec:
    """Gated cross-attention layer; with ``te`` both norms are fused into linear_q / linear_fc1."""
    if backend == "te":
        from megatron.core.extensions import transformer_engine as te

        attn = GQACrossAttentionSubmodules(
            linear_q=te.TELayerNormColumnParallelLinear, linear_kv=te.TEColumnParallelLinear,
            core_attention=te.TEDotProductAttention, linear_proj=te.TERowParallelLinear)
        norm = IdentityOp
    elif backend == "local":
        attn = GQACrossAttentionSubmodules(
            linear_q=ColumnParallelLinear, linear_kv=ColumnParallelLinear,
            core_attention=SDPAttention, linear_proj=RowParallelLinear)
        norm = specs.LocalNorm
    else:
        raise ValueError(f"backend={backend!r}: allowed {specs.BACKENDS}")
    return ModuleSpec(module=GatedCrossAttentionLayer, submodules=TransformerLayerSubmodules(
        input_layernorm=norm,
        cross_attention=ModuleSpec(module=GQACrossAttention, submodules=attn),
        pre_mlp_layernorm=norm,
        mlp=specs.mlp_spec(backend),
        # dist checkpoints name the norms as TE's fused linears do, for both backends
        sharded_state_dict_keys_map={} if backend == "te" else dict(CA_TE_NORM_KEYS),
    ))


def stage_block_spec(config: TransformerConfig, backend: str, ca_indices: list[int],
                     vp_stage: int | None = None) -> TransformerBlockSubmodules:
    """This (virtual) pipeline stage's slice of the heterogeneous layer list + final norm."""
    from megatron.core.transformer.transformer_block import get_num_layers_to_build
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    n = get_num_layers_to_build(config, vp_stage)
    offset = get_transformer_layer_offset(config, vp_stage)
    ca, self_spec, ca_spec = set(ca_indices), specs.language_layer_spec(backend), cross_attention_layer_spec(backend)
    return TransformerBlockSubmodules(
        layer_specs=[ca_spec if offset + i in ca else self_spec for i in range(n)],
        layer_norm=specs.norm_module(backend))


# ------------------------------------------------------------------------------------------------
# Masks
# ------------------------------------------------------------------------------------------------

def image_permission(b: int, s: int, n: int, text_image_mask: torch.Tensor | None,
                     image_mask: torch.Tensor | None, device) -> torch.Tensor:
    """bool ``[b, s, n]``: text token t may attend image i (text_image_mask AND image present;
    missing masks mean 'yes')."""
    allowed = torch.ones(b, s, n, dtype=torch.bool, device=device)
    if text_image_mask is not None:
        if tuple(text_image_mask.shape) != (b, s, n):
            raise ValueError(f"text_image_mask shape {tuple(text_image_mask.shape)}: expected "
                             f"[batch, seq, images] = {(b, s, n)}")
        allowed = allowed & text_image_mask.to(device=device, dtype=torch.bool)
    if image_mask is not None:
        if tuple(image_mask.shape) != (b, n):
            raise ValueError(f"image_mask shape {tuple(image_mask.shape)}: expected [batch, images] = {(b, n)}")
        allowed = allowed & image_mask.to(device=device, dtype=torch.bool)[:, None, :]
    return allowed


def context_mask_from_permission(allowed: torch.Tensor, tokens_per_image: int) -> torch.Tensor:
    """``[b, s, n]`` permission -> megatron mask ``[b, 1, s, n*k]`` (True = do not attend)."""
    return ~allowed.repeat_interleave(tokens_per_image, dim=2)[:, None]


# ------------------------------------------------------------------------------------------------
# The arch
# ------------------------------------------------------------------------------------------------

@register_arch("cross_attention")
class CrossAttentionVLM(VLMModel):
    """Vision encoder -> projector -> text decoder with gated cross-attention layers (Mllama).

    ``forward(tokens, position_ids, images=None, image_mask=None, labels=None,
    text_image_mask=None, cross_attention_states=None, inference_context=None)``; instead of
    ``images`` one may pass precomputed ``cross_attention_states`` ``[b, n, k, h]`` or
    ``[b, n*k, h]`` (HF's argument of the same name). ``text_image_mask`` ``[b, s, n]`` True = token
    may attend image n; None = every token may attend every present image.
    """

    images_per_sample = 1  # image slots per sample on the pipeline wire; set_images_per_sample()

    def __init__(self, cfg, parallel, **kwargs):
        self.cross_attention_layer_indices = cross_attention_layer_indices(
            cfg.language.num_layers, cfg.cross_attention.every, cfg.cross_attention.layers)
        self._packed_input = None
        self._has_images = False
        super().__init__(cfg, parallel, **kwargs)
        self.set_text_rows_without_image(cfg.cross_attention.text_rows_without_image)

    # ---- construction -------------------------------------------------------------------------
    def build_language_model(self) -> GPTModel:
        return self.gpt_model(stage_block_spec(self.language_config, self.backend,
                                               self.cross_attention_layer_indices, self.vp_stage))

    def cross_attention_layers(self) -> list[GatedCrossAttentionLayer]:
        """This stage's CA layers."""
        return [l for l in self.language_model.decoder.layers if isinstance(l, GatedCrossAttentionLayer)]

    def set_text_rows_without_image(self, mode: str) -> None:
        """``"zero"`` (default, Meta's reference): text rows that may attend no image get no
        cross-attention contribution. ``"hf"``: HF transformers' behaviour (their attention branch
        attends all image tokens; only the MLP branch is zeroed)."""
        if mode not in TEXT_ROW_MODES:
            raise ValueError(f"text rows without image: mode={mode!r}, allowed {TEXT_ROW_MODES}")
        for layer in self.cross_attention_layers():
            layer.text_rows_without_image = mode

    def set_images_per_sample(self, n: int) -> None:
        self.images_per_sample = int(n)

    def pipeline_seq_length(self, images_per_sample: int | None = None) -> int:
        """Length of the tensors pipeline stages exchange: text + packed image tokens when PP > 1."""
        s = self.cfg.language.seq_length
        if self.language_config.pipeline_model_parallel_size == 1:
            return s
        n = self.images_per_sample if images_per_sample is None else images_per_sample
        return s + n * self.cfg.num_image_tokens

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        metadata = dict(metadata or {}, non_homogeneous_layers=True)
        return super().sharded_state_dict(prefix, sharded_offsets, metadata)

    def load_text_decoder(self, text_state_dict: dict, prefix: str = "language_model.") -> None:
        """Warm start from a text-only decoder of the same dims with ``num_layers - len(CA)``
        layers (e.g. a joint_decoder/GPT ``state_dict()``, TP=1, PP=1): its layer j goes to the j-th
        self-attention entry, CA layers keep their init (gates 0, so the text loss is unchanged)."""
        mapping = text_layer_indices(self.cfg.language.num_layers, self.cross_attention_layer_indices)
        ca, head = set(self.cross_attention_layer_indices), f"{prefix}decoder.layers."
        layer_of = lambda key: int(key[len(head):].split(".", 1)[0])  # noqa: E731
        own, out = self.state_dict(), {}
        for key, value in text_state_dict.items():
            if not key.startswith(prefix):
                continue  # vision side etc.: not part of the text decoder
            if key.startswith(head):
                if layer_of(key) >= len(mapping):
                    raise ValueError(f"text decoder has layer {layer_of(key)}; this model has "
                                     f"{len(mapping)} self-attention layers")
                key = f"{head}{mapping[layer_of(key)]}.{key[len(head):].split('.', 1)[1]}"
            if key not in own:
                raise ValueError(f"text decoder key {key!r} has no place in the cross_attention model")
            out[key] = value
        missing = [k for k in own if k.startswith(prefix) and k not in out and not k.endswith("_extra_state")
                   and not (k.startswith(head) and layer_of(k) in ca)]
        if missing:
            raise ValueError(f"text decoder lacks {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        self.load_state_dict(out, strict=False)

    # ---- forward ------------------------------------------------------------------------------
    def set_input_tensor(self, input_tensor) -> None:
        if isinstance(input_tensor, (list, tuple)):
            input_tensor = input_tensor[0]
        self._packed_input = input_tensor
        self.language_model.set_input_tensor(input_tensor)

    def forward(self, tokens, position_ids, images=None, image_mask=None, labels=None,
                text_image_mask=None, **kwargs):
        self._has_images = images is not None or kwargs.get("cross_attention_states") is not None
        return super().forward(tokens, position_ids, images=images, image_mask=image_mask,
                               labels=labels, text_image_mask=text_image_mask, **kwargs)

    def _features(self, image_embeddings, n_hint: int | None) -> tuple[torch.Tensor, int, int]:
        """``[b, n, k, h]`` or ``[b, n*k, h]`` -> (context ``[n*k, b, h]``, n, k)."""
        h = self.cfg.language.hidden_size
        if image_embeddings.dim() not in (3, 4) or image_embeddings.shape[-1] != h:
            raise ValueError(f"image features of shape {tuple(image_embeddings.shape)}: expected "
                             f"[batch, images, tokens, {h}] or [batch, images*tokens, {h}] "
                             f"(language hidden size {h})")
        if image_embeddings.dim() == 4:
            b, n, k, _ = image_embeddings.shape
        else:
            b, nk, _ = image_embeddings.shape
            n = n_hint or 1
            if nk % n:
                raise ValueError(f"{nk} image feature tokens do not split into {n} images")
            k = nk // n
        context = image_embeddings.reshape(b, n * k, h).transpose(0, 1).contiguous()
        return context.to(self.language_config.params_dtype), n, k

    def language_forward(self, tokens, position_ids, image_embeddings, image_mask, labels,
                         text_image_mask, cross_attention_states=None, inference_context=None,
                         **kwargs):
        b, s = tokens.shape
        sp = self.language_config.sequence_parallel
        tp = parallel_state.get_tensor_model_parallel_world_size()
        n_hint = (text_image_mask.shape[-1] if text_image_mask is not None
                  else image_mask.shape[-1] if image_mask is not None else None)
        if cross_attention_states is not None:
            if image_embeddings is not None:
                raise ValueError("pass either images or cross_attention_states, not both")
            image_embeddings = cross_attention_states

        context, n, k = None, None, None
        if self.pre_process:
            if image_embeddings is not None:
                context, n, k = self._features(image_embeddings, n_hint)
                if sp:
                    context = tensor_parallel.scatter_to_sequence_parallel_region(context)
        else:  # unpack [text ; image tokens] received from the previous stage
            packed = self._packed_input
            s_local = s // tp if sp else s
            self.language_model.set_input_tensor(packed[:s_local])
            if self._has_images:
                context = packed[s_local:]
                nk = context.shape[0] * (tp if sp else 1)
                n = n_hint or 1
                k = nk // n

        cache = _cache_of(inference_context)
        if text_image_mask is not None and inference_context is not None and text_image_mask.shape[1] != s:
            offset = inference_context.sequence_len_offset  # a full-length mask: this step's rows
            text_image_mask = text_image_mask[:, offset:offset + s]
        context_mask = None
        if context is not None:
            allowed = image_permission(b, s, n, text_image_mask, image_mask, tokens.device)
            context_mask = context_mask_from_permission(allowed, k)
            if cache is not None:
                cache.last_row, cache.tokens_per_image = allowed[:, -1], k
        elif cache is not None and cache.kv:  # decoding step: image K/V come from the cache
            n = cache.last_row.shape[1]
            allowed = (image_permission(b, s, n, text_image_mask, image_mask, tokens.device)
                       if text_image_mask is not None else
                       cache.last_row[:, None, :].expand(b, s, n)
                       & image_permission(b, s, n, None, image_mask, tokens.device))
            context_mask = context_mask_from_permission(allowed, cache.tokens_per_image)

        if inference_context is not None:
            kwargs.setdefault("runtime_gather_output", True)  # megatron: inference gathers TP logits
        out = self.language_model(input_ids=tokens, position_ids=position_ids, attention_mask=None,
                                  labels=labels, inference_context=inference_context,
                                  extra_block_kwargs={"context": context, "context_mask": context_mask},
                                  **kwargs)
        if self.post_process:
            return out
        # pack the image tokens behind the text for the next stage
        if context is None:
            nk = self.images_per_sample * self.cfg.num_image_tokens
            context = out.new_zeros((nk // tp if sp else nk), b, out.shape[-1])
        expected = self.pipeline_seq_length()
        got = out.shape[0] * (tp if sp else 1) + context.shape[0] * (tp if sp else 1)
        if got != expected:
            raise ValueError(f"pipeline tensor of {got} tokens (text {s} + {got - s} image tokens) but the "
                             f"schedule expects pipeline_seq_length()={expected}: call "
                             f"set_images_per_sample(n) / pass seq_length=model.pipeline_seq_length(n)")
        return torch.cat([out, context], dim=0)
