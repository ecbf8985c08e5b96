"""Fixes for megatron-core 0.16.1 bugs that are not CPU-specific.

Applied by :func:`megatron_vlm.runtime.initialize` (CPU and GPU) when the bug's condition holds;
idempotent. Like ``cpu.py`` this is a place that touches megatron-core internals, kept apart so
that a GPU run gets exactly these fixes and nothing CPU-related.
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
    return done
