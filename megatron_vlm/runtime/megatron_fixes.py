"""Fixes for megatron-core 0.16.1 bugs (and decoding costs) that are not CPU-specific.

Applied by :func:`megatron_vlm.runtime.initialize` (CPU and GPU) when the bug's condition holds;
idempotent. Like ``cpu.py`` this is a place that touches megatron-core internals, kept apart so
that a GPU run gets exactly these fixes and nothing CPU-related. Also here, called by the
conversion CLI before anything imports megatron-core: :func:`import_megatron_without_jit_fusion`.
"""

from __future__ import annotations

import torch

_applied: set[str] = set()


def _fix_torch_adam_checkpoint():
    """Without apex/TE the ``DistributedOptimizer`` wraps torch Adam, whose per-parameter ``step``
    breaks loading a checkpoint (``distrib_optimizer.py``): ``state_dict()`` asserts one common
    step, and before the first step there is none; ``_set_main_param_and_optimizer_states`` copies
    every state key, ``step`` included, which the loaded parameter state does not carry (KeyError);
    ``load_state_dict`` gives all parameters ONE shared ``step`` tensor, which torch Adam then
    increments once per parameter (wrong bias correction after a resume). Empty states get Adam's
    zero state, ``step`` is skipped when setting, and loaded steps are unshared."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    original_state_dict = DistributedOptimizer.state_dict
    original_set = DistributedOptimizer._set_main_param_and_optimizer_states
    original_load = DistributedOptimizer.load_state_dict

    def state_dict(self):
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                state = self.optimizer.state[p]
                if "step" not in state:
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                    state["step"] = torch.zeros((), dtype=torch.float32)
        return original_state_dict(self)

    def set_states(self, model_param, tensors):
        group_index, group_order = self.model_param_group_index_map[model_param]
        main_param = self.optimizer.param_groups[group_index]["params"][group_order]
        step = self.optimizer.state[main_param].pop("step", None)
        try:
            original_set(self, model_param, tensors)
        finally:
            if step is not None:
                self.optimizer.state[main_param]["step"] = step

    def load_state_dict(self, state_dict):
        original_load(self, state_dict)
        for state in self.optimizer.state.values():
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].clone()

    DistributedOptimizer.state_dict = state_dict
    DistributedOptimizer.load_state_dict = load_state_dict
    DistributedOptimizer._set_main_param_and_optimizer_states = set_states


def _fix_static_cache_rope():
    """Generation with megatron's ``StaticInferenceContext``: ``Attention._adjust_key_value_for_inference``
    stores the keys before RoPE and hands back the embedding of every cached position, so the
    attention re-rotates the whole cache ``[0, offset + s)`` at every decoding step (O(sequence) work
    per layer and step; the dynamic context rotates each key once). Self-attention keys are rotated
    here, with their own positions ``[offset, offset + s)``, before they enter the cache, and the
    attention gets the query's embedding only. RoPE is elementwise per position, so the attention
    sees the same keys, bit for bit. Training (no context), flash decoding (rotates before caching
    itself), layers without RoPE and cross-attention take megatron's path unchanged."""
    from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
    from megatron.core.transformer import attention

    original = attention.Attention._adjust_key_value_for_inference

    def adjust(self, inference_context, query, key, value, rotary_pos_emb, *args, **kwargs):
        if (inference_context is None or not inference_context.is_static_batching() or self.config.flash_decode
                or self.attention_type != "self" or not isinstance(rotary_pos_emb, tuple)
                or rotary_pos_emb[1] is None):
            return original(self, inference_context, query, key, value, rotary_pos_emb, *args, **kwargs)
        start = inference_context.sequence_len_offset
        key = apply_rotary_pos_emb(key, rotary_pos_emb[1][start:start + key.shape[0]], config=self.config,
                                   mscale=attention._yarn_get_concentration_factor_from_config(self.config),
                                   cp_group=self.pg_collection.cp)
        query, key, value, (q_pos_emb, _), mask_type, block_table = original(
            self, inference_context, query, key, value, rotary_pos_emb, *args, **kwargs)
        return query, key, value, (q_pos_emb, None), mask_type, block_table

    attention.Attention._adjust_key_value_for_inference = adjust


def _fix_no_grad_linear():
    """Outside autograd (generation, eval under ``no_grad``) megatron's parallel linears still run
    through an autograd Function (``LinearWithGradAccumulationAndAsyncCommunication`` /
    ``LinearWithFrozenWeight``, with its autocast decorator and process-group lookup: ~1 ms of Python
    per decoding step of a 4-layer model), whose forward is ``matmul(input, weight.t()) (+ bias)``
    once the sequence-parallel all-gather is done. Without grad and without sequence parallelism,
    call that matmul directly: the same op, the same result. Likewise the linears' TP mappings
    (autograd Functions too): without grad, copy-to-region is the input itself and
    reduce-from-region the all-reduce alone (nothing at TP=1)."""
    from megatron.core.tensor_parallel import layers, mappings
    from megatron.core.utils import get_tensor_model_parallel_group_if_none

    copy_to, reduce_from = layers.copy_to_tensor_model_parallel_region, layers.reduce_from_tensor_model_parallel_region

    def copy_to_region(input_, group=None):
        return copy_to(input_, group) if torch.is_grad_enabled() else input_

    def reduce_from_region(input_, group=None):
        if torch.is_grad_enabled():
            return reduce_from(input_, group)
        return mappings._reduce(input_, get_tensor_model_parallel_group_if_none(group))

    layers.copy_to_tensor_model_parallel_region = copy_to_region  # the names the linears call
    layers.reduce_from_tensor_model_parallel_region = reduce_from_region

    for cls in (layers.ColumnParallelLinear, layers.RowParallelLinear):
        original = cls._forward_impl

        def _forward_impl(self, input, weight, *args, _original=original, **kwargs):
            if torch.is_grad_enabled() or args or kwargs.get("sequence_parallel"):
                return _original(self, input, weight, *args, **kwargs)
            output = torch.matmul(input, weight.t())
            bias = kwargs.get("bias")
            return output if bias is None else output + bias

        cls._forward_impl = _forward_impl


def needs_torch_adam_fix() -> bool:
    """The distributed optimizer wraps torch Adam (not apex/TE FusedAdam) when neither imports."""
    from megatron.core.optimizer import distrib_optimizer

    return not distrib_optimizer.HAVE_APEX_OR_TE


def apply() -> list[str]:
    """Apply the fixes whose condition holds; returns the names applied by this call."""
    done = []
    if needs_torch_adam_fix() and "torch_adam_checkpoint" not in _applied:
        _fix_torch_adam_checkpoint()
        _applied.add("torch_adam_checkpoint")
        done.append("torch_adam_checkpoint")
    for name, fix in (("static_cache_rope", _fix_static_cache_rope), ("no_grad_linear", _fix_no_grad_linear)):
        if name not in _applied:
            fix()
            _applied.add(name)
            done.append(name)
    return done


def import_megatron_without_jit_fusion() -> bool:
    """Import megatron-core with its ``jit_fuser`` decorator a no-op (the choice
    ``megatron.core.jit.disable_jit_fuser`` makes), for processes that run no model (conversion).

    By default ``megatron.core.jit`` picks ``torch.compile`` when it is imported and ~40 functions
    are wrapped at import time, which imports dynamo and inductor (~1.3 s of a conversion's time);
    the functions themselves are never called there. ``torch.compile`` is a plain decorator only
    while megatron-core is imported, so the choice binds to that import and nothing else. Returns
    False (and changes nothing) when megatron-core is already imported."""
    import sys

    if "megatron.core" in sys.modules:
        return False

    def no_compile(model=None, **_):
        return model if model is not None else (lambda fn: fn)

    compile_ = torch.compile
    torch.compile = no_compile
    try:
        import megatron.core.jit
    finally:
        torch.compile = compile_
    return megatron.core.jit.jit_fuser is no_compile
