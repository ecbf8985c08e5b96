"""Layer backends: one provider object answers "which linear / norm / attention" for ``local`` or
``te``, built on megatron-core's own ``BackendSpecProvider`` (``LocalSpecProvider``,
``TESpecProvider``).

* ``local``: megatron-core's parallel linears, :class:`LocalNorm` (torch norms that support
  sequence parallelism) and :class:`~megatron_vlm.models.attention.SDPAttention` (torch's fused
  scaled-dot-product attention); CPU and GPU.
* ``te``: Transformer Engine modules (GPU only; FP8 capable); the norms before attention and MLP
  are fused into the next linear. Chosen by ``auto`` when TE imports and CUDA is present.

Checkpoint names: the local backend's norms are saved under the names TE's fused linears give them
(:func:`te_norm_keys`), so one dist checkpoint loads with either backend. That table lives here only.
"""

from __future__ import annotations

import torch

BACKENDS = ("local", "te")

# The linear a TE layer fuses its input norm into, per attention kind (megatron-core names).
ATTENTION_INPUT_LINEARS = ("self_attention.linear_qkv", "cross_attention.linear_q")
MLP_INPUT_LINEAR = "mlp.linear_fc1"


def te_norm_keys(attention_linear: str = "self_attention.linear_qkv") -> dict[str, str]:
    """Local norm prefix -> TE fused-norm prefix of one layer (``sharded_state_dict_keys_map``)."""
    return {"input_layernorm.": f"{attention_linear}.layer_norm_",
            "pre_mlp_layernorm.": f"{MLP_INPUT_LINEAR}.layer_norm_"}


def te_norm_aliases() -> list[tuple[str, str]]:
    """Every (local prefix, TE prefix) pair a checkpoint reader may meet."""
    return sorted({pair for linear in ATTENTION_INPUT_LINEARS for pair in te_norm_keys(linear).items()})


def te_available() -> bool:
    """True when Transformer Engine imports and CUDA is present (TE raises RuntimeError without CUDA)."""
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:
        return False
    return True


def resolve_backend(name: str) -> str:
    """``auto`` -> ``te`` when available else ``local``; ``te`` without TE/CUDA is an error."""
    if name == "auto":
        return "te" if te_available() else "local"
    if name not in BACKENDS:
        raise ValueError(f"backend={name!r}: allowed 'auto', 'local', 'te'")
    if name == "te" and not te_available():
        raise ValueError("backend='te' needs Transformer Engine and a CUDA device; use 'local' or 'auto'")
    return name


class LocalNorm:
    """LayerNorm/RMSNorm from torch, built like a megatron norm (``config``, ``hidden_size``, ``eps``).

    Unlike megatron's ``WrappedTorchNorm`` it supports sequence parallelism: megatron's contract for
    SP norms is only that their parameters carry ``sequence_parallel=True`` so that
    ``finalize_model_grads`` all-reduces their gradients over the TP group.
    """

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, **unused):
        if config.normalization == "RMSNorm":
            norm = torch.nn.RMSNorm(hidden_size, eps=eps, dtype=config.params_dtype)
        elif config.normalization == "LayerNorm":
            norm = torch.nn.LayerNorm(hidden_size, eps=eps, dtype=config.params_dtype)
        else:
            raise ValueError(f"normalization={config.normalization!r}: allowed 'LayerNorm', 'RMSNorm'")
        for p in norm.parameters():
            setattr(p, "sequence_parallel", config.sequence_parallel)
        return norm


def _local_provider():
    from megatron.core.models.backends import LocalSpecProvider

    from megatron_vlm.models.attention import SDPAttention

    class LocalBackend(LocalSpecProvider):
        name = "local"

        def layer_norm(self, rms_norm: bool = False, for_qk: bool = False) -> type:
            return LocalNorm

        def core_attention(self) -> type:
            return SDPAttention

        def sharded_state_dict_keys_map(self, attention_linear: str) -> dict[str, str]:
            return te_norm_keys(attention_linear)

    return LocalBackend()


def _te_provider():
    from megatron.core.extensions.transformer_engine_spec_provider import TESpecProvider

    class TEBackend(TESpecProvider):
        name = "te"

        def sharded_state_dict_keys_map(self, attention_linear: str) -> dict[str, str]:
            return {}  # TE's own names

    return TEBackend()


def provider(name: str):
    """The provider of ``local`` or ``te`` (no availability check: specs can be built anywhere):
    megatron's ``BackendSpecProvider`` API (``column_parallel_linear()``, ``row_parallel_linear()``,
    ``fuse_layernorm_and_linear()``, ``column_parallel_layer_norm_linear()``, ``layer_norm()``,
    ``core_attention()``, ...) plus ``name`` and ``sharded_state_dict_keys_map(attention_linear)``."""
    if name not in BACKENDS:
        raise ValueError(f"backend={name!r}: allowed {list(BACKENDS)}")
    return _te_provider() if name == "te" else _local_provider()


def backend_provider(name: str):
    """The provider the model of this machine uses for ``name`` (``auto`` resolved; ``te``
    without Transformer Engine is an error)."""
    return provider(resolve_backend(name))
