"""``cross_attention`` arch (Llama-3.2-Vision / Mllama layout): the residual stream carries text
only; projected image features enter as keys/values of gated cross-attention layers that sit in the
decoder's layer list between the self-attention layers.

Layer placement: ``config.py``; the gated cross-attention layer: ``layers.py``.

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
``_extra_state`` entries. The mapping from/to HF lives in ``hf_mllama.py`` / ``hf_mllama_text.py``.
Checkpoints: layers are non-homogeneous (``ArchSpec.homogeneous_layers=False``: the model's
``sharded_state_dict`` sets ``metadata["non_homogeneous_layers"] = True``).

Pipeline parallel: layers are split across stages by global index (megatron's uniform split,
``get_transformer_layer_offset``). The vision encoder + projector live on the first stage; image
features travel to later stages *packed behind the text along the sequence axis*: every non-last
stage sends ``[s + n*k, b, h]`` (``[(s + n*k)/tp, b, h]`` with sequence parallelism, the image part
sharded along n*k as the K/V projection all-gathers it). megatron's p2p thus carries features
forward and their gradients back to the encoder. The schedule's ``seq_length`` must be
:func:`pipeline_seq_length` (``s + images_per_sample * k`` when PP > 1, else s; the arch spec's;
k = :func:`tokens_per_image`, ``max_tiles`` x tokens per tile for tiled Mllama images).

Generation: pass a megatron ``StaticInferenceContext``; CA layers store their image K/V in
``inference_context.cross_attention_cache`` on the step that has images (prefill) and reuse them on
decoding steps without images.
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state, tensor_parallel

from megatron_vlm.archs.cross_attention.config import TEXT_ROW_MODES, layer_indices, text_layer_indices
from megatron_vlm.archs.cross_attention.layers import (GatedCrossAttentionLayer, _cache_of,
                                                       context_mask_from_permission, image_permission)
from megatron_vlm.models.vlm import VLMModel

def tokens_per_image(model_cfg) -> int:
    """Image feature tokens per image: every tile's (``model.vision.max_tiles``, padded tiles too);
    several encoders (never tiled): the fused tokens (``num_image_tokens``)."""
    return model_cfg.generalist.max_tiles * model_cfg.num_image_tokens


def wire_length(model_cfg, pipeline_size: int, images_per_sample: int) -> int:
    """Length of the tensors pipeline stages exchange: text + packed image tokens when PP > 1."""
    s = model_cfg.language.seq_length
    return s if pipeline_size == 1 else s + images_per_sample * tokens_per_image(model_cfg)


def pipeline_seq_length(cfg) -> int:
    """``ArchSpec.pipeline_seq_length``."""
    return wire_length(cfg.model, cfg.parallel.pipeline_model_parallel_size, cfg.data.images_per_sample)


class CrossAttentionVLM(VLMModel):
    """Vision encoder -> projector -> text decoder with gated cross-attention layers (Mllama).

    ``forward(inputs)``: instead of ``inputs.images`` one may pass precomputed
    ``inputs.cross_attention_states`` ``[b, n, k, h]`` or ``[b, n*k, h]`` (HF's argument of the same
    name). ``inputs.text_image_mask`` ``[b, s, n]`` True = token may attend image n; None = every
    token may attend every present image. Tiled images (``inputs.aspect_ratio_mask`` ``[b, n, T]``;
    features ``[b, n, T*k, h]``): a token attends the real tiles of the images it may attend.
    With a megatron ``StaticInferenceContext`` CA layers cache the image K/V on the step that has
    images and reuse them on decoding steps.
    """

    def __init__(self, cfg, **kwargs):
        self.cross_attention_layer_indices = layer_indices(cfg.model)
        self._packed_input = None
        super().__init__(cfg, **kwargs)
        self.set_text_rows_without_image(cfg.model.cross_attention.text_rows_without_image)

    # ---- construction -------------------------------------------------------------------------
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

    def pipeline_seq_length(self) -> int:
        return wire_length(self.cfg, self.language_config.pipeline_model_parallel_size, self.images_per_sample)

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

    def language_forward(self, inputs, decoder_input, image_embeddings, context,
                         inference_context=None, runtime_gather_output=None):
        tokens, text_image_mask, image_mask = inputs.tokens, inputs.text_image_mask, inputs.image_mask
        b, s = tokens.shape
        sp = self.language_config.sequence_parallel
        tp = parallel_state.get_tensor_model_parallel_world_size()
        n_hint = (text_image_mask.shape[-1] if text_image_mask is not None
                  else image_mask.shape[-1] if image_mask is not None else None)
        has_images = inputs.images is not None or inputs.cross_attention_states is not None
        if inputs.cross_attention_states is not None:
            if image_embeddings is not None or inputs.images is not None:
                raise ValueError("pass either images or cross_attention_states, not both")
            image_embeddings = inputs.cross_attention_states

        features, n, k = None, None, None
        if self.pre_process:
            if image_embeddings is not None:
                features, n, k = self._features(image_embeddings, n_hint)
                if sp:
                    features = tensor_parallel.scatter_to_sequence_parallel_region(features)
        else:  # unpack [text ; image tokens] received from the previous stage
            packed = self._packed_input
            s_local = s // tp if sp else s
            self.language_model.set_input_tensor(packed[:s_local])
            if has_images:
                features = packed[s_local:]
                nk = features.shape[0] * (tp if sp else 1)
                n = n_hint or 1
                k = nk // n

        cache = _cache_of(inference_context)
        if text_image_mask is not None and inference_context is not None and text_image_mask.shape[1] != s:
            offset = inference_context.sequence_len_offset  # a full-length mask: this step's rows
            text_image_mask = text_image_mask[:, offset:offset + s]
        features_mask, tile_mask = None, inputs.aspect_ratio_mask
        if features is not None:
            allowed = image_permission(b, s, n, text_image_mask, image_mask, tokens.device)
            features_mask = context_mask_from_permission(allowed, k, tile_mask)
            if cache is not None:
                cache.last_row, cache.tokens_per_image, cache.tile_mask = allowed[:, -1], k, tile_mask
        elif cache is not None and cache.kv:  # decoding step: image K/V come from the cache
            n = cache.last_row.shape[1]
            allowed = (image_permission(b, s, n, text_image_mask, image_mask, tokens.device)
                       if text_image_mask is not None else
                       cache.last_row[:, None, :].expand(b, s, n)
                       & image_permission(b, s, n, None, image_mask, tokens.device))
            features_mask = context_mask_from_permission(allowed, cache.tokens_per_image, cache.tile_mask)

        if inference_context is not None and runtime_gather_output is None:
            runtime_gather_output = True  # megatron: inference gathers TP logits
        out = self.language_model(input_ids=tokens, position_ids=inputs.position_ids, attention_mask=None,
                                  decoder_input=decoder_input, labels=inputs.labels,
                                  inference_context=inference_context,
                                  runtime_gather_output=runtime_gather_output, padding_mask=context,
                                  extra_block_kwargs={"context": features, "context_mask": features_mask})
        if self.post_process:
            return out
        # pack the image tokens behind the text for the next stage
        if features is None:
            nk = self.images_per_sample * tokens_per_image(self.cfg)
            features = out.new_zeros((nk // tp if sp else nk), b, out.shape[-1])
        expected = self.pipeline_seq_length()
        got = out.shape[0] * (tp if sp else 1) + features.shape[0] * (tp if sp else 1)
        if got != expected:
            raise ValueError(f"pipeline tensor of {got} tokens (text {s} + {got - s} image tokens) but the "
                             f"schedule expects {expected} (text + data.images_per_sample="
                             f"{self.images_per_sample} x {tokens_per_image(self.cfg)} image tokens)")
        return torch.cat([out, features], dim=0)
