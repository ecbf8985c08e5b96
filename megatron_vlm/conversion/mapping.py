"""Declarative HF <-> Megatron key maps and the shared tensor transforms they use.

A family's map is a list of :class:`Pair` — one Megatron tensor and the HF tensor(s) it is made of,
plus the :class:`Op` that converts between them. Ops are the only place tensors are reshaped:

* :class:`Identity`             same tensor (optionally cast)
* :class:`QKV`                  ``q_proj/k_proj/v_proj`` <-> megatron's fused ``linear_qkv`` whose
                                rows are interleaved per query group ``[q heads of g; k_g; v_g]``
                                (weights and biases; MHA is the case groups == heads)
* :class:`KV`                   cross-attention ``k_proj/v_proj`` <-> ``linear_kv`` rows per query
                                group ``[k_g; v_g]``
* :class:`GateUp`               ``gate_proj/up_proj`` <-> SwiGLU ``linear_fc1`` = ``cat([gate, up])``
* :class:`PadRows`              embeddings / output layer padded with zero rows to the Megatron vocab
* :class:`Reshape`              same data, other shape (CLIP ``class_embedding`` <-> ``class_token``)

Every Megatron tensor is described in its TP=1 / PP=1 ("global") layout: the layout megatron's
dist_checkpointing stores (TP shards and the per-rank ``[gate_r; up_r]`` split of SwiGLU are
applied by megatron itself on load, see :func:`split_gate_up_tp` for the per-rank view).

Maps are written as templates with ``{i}`` for a layer index (:class:`Rule`) and expanded for a
given depth with :func:`expand`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Sequence

import torch


class ConversionError(RuntimeError):
    """A conversion that cannot proceed. ``str(e)`` is one line (details may follow on
    further lines only for key lists)."""


# ------------------------------------------------------------------------------------------------
# Shared tensor helpers
# ------------------------------------------------------------------------------------------------

def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int,
             num_groups: int) -> torch.Tensor:
    """``q [nq*d, ...]``, ``k/v [ng*d, ...]`` -> megatron ``linear_qkv`` ``[(nq + 2 ng) d, ...]``,
    rows grouped per query group: ``[q heads of group g (nq/ng * d); k_g (d); v_g (d)]``."""
    if num_heads % num_groups:
        raise ConversionError(f"num_heads={num_heads} is not a multiple of num_query_groups={num_groups}")
    d = k.shape[0] // num_groups
    if q.shape[0] != num_heads * d or v.shape[0] != num_groups * d:
        raise ConversionError(f"q/k/v rows {q.shape[0]}/{k.shape[0]}/{v.shape[0]} do not match "
                              f"{num_heads} heads, {num_groups} groups, head dim {d}")
    rest = q.shape[1:]
    qg = q.reshape(num_groups, (num_heads // num_groups) * d, *rest)
    kg = k.reshape(num_groups, d, *rest)
    vg = v.reshape(num_groups, d, *rest)
    return torch.cat([qg, kg, vg], dim=1).reshape((num_heads + 2 * num_groups) * d, *rest)


def split_qkv(qkv: torch.Tensor, num_heads: int, num_groups: int
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of :func:`fuse_qkv`: ``linear_qkv`` -> contiguous ``(q, k, v)``."""
    total = num_heads + 2 * num_groups
    if qkv.shape[0] % total:
        raise ConversionError(f"linear_qkv rows {qkv.shape[0]} not divisible by heads + 2 groups = {total}")
    d = qkv.shape[0] // total
    per = num_heads // num_groups
    rest = qkv.shape[1:]
    g = qkv.reshape(num_groups, (per + 2) * d, *rest)
    q = g[:, :per * d].reshape(num_heads * d, *rest).contiguous()
    k = g[:, per * d:(per + 1) * d].reshape(num_groups * d, *rest).contiguous()
    v = g[:, (per + 1) * d:].reshape(num_groups * d, *rest).contiguous()
    return q, k, v


def fuse_kv(k: torch.Tensor, v: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Cross-attention ``linear_kv`` (K/V from the image side): rows per query group ``[k_g; v_g]``."""
    if k.shape != v.shape or k.shape[0] % num_groups:
        raise ConversionError(f"k {tuple(k.shape)} / v {tuple(v.shape)} do not split into {num_groups} groups")
    d = k.shape[0] // num_groups
    rest = k.shape[1:]
    return torch.cat([k.reshape(num_groups, d, *rest), v.reshape(num_groups, d, *rest)],
                     dim=1).reshape(2 * num_groups * d, *rest)


def split_kv(kv: torch.Tensor, num_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    rest = kv.shape[1:]
    g = kv.reshape(num_groups, 2, kv.shape[0] // (2 * num_groups), *rest)
    return (g[:, 0].reshape(-1, *rest).contiguous(), g[:, 1].reshape(-1, *rest).contiguous())


def fuse_gate_up(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SwiGLU ``linear_fc1`` in the global (TP=1) layout: gate rows then up rows."""
    if gate.shape != up.shape:
        raise ConversionError(f"gate {tuple(gate.shape)} and up {tuple(up.shape)} shapes differ")
    return torch.cat([gate, up], dim=0)


def split_gate_up(fc1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    gate, up = torch.chunk(fc1, 2, dim=0)
    return gate.contiguous(), up.contiguous()


def split_gate_up_tp(fc1: torch.Tensor, tp: int) -> list[torch.Tensor]:
    """The per-rank ``linear_fc1`` shards at TP=``tp``: rank r holds ``[gate_r; up_r]``."""
    gate, up = split_gate_up(fc1)
    return [torch.cat([g, u]) for g, u in zip(gate.chunk(tp), up.chunk(tp))]


def merge_gate_up_tp(shards: Sequence[torch.Tensor]) -> torch.Tensor:
    """Inverse of :func:`split_gate_up_tp`."""
    halves = [split_gate_up(s) for s in shards]
    return fuse_gate_up(torch.cat([h[0] for h in halves]), torch.cat([h[1] for h in halves]))


# ------------------------------------------------------------------------------------------------
# Ops
# ------------------------------------------------------------------------------------------------

class Op:
    """Converts one Megatron tensor <-> a tuple of HF tensors."""

    n_hf = 1

    def to_mcore(self, hf: Sequence[torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def to_hf(self, t: torch.Tensor) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError

    def hf_shapes(self, shape: tuple) -> list[tuple]:
        """Shapes of the HF tensors made from a Megatron tensor of ``shape`` (no data needed)."""
        raise NotImplementedError


@dataclass(frozen=True)
class Identity(Op):
    def to_mcore(self, hf):
        return hf[0]

    def to_hf(self, t):
        return (t,)

    def hf_shapes(self, shape):
        return [tuple(shape)]


@dataclass(frozen=True)
class QKV(Op):
    num_heads: int
    num_groups: int
    n_hf = 3

    def to_mcore(self, hf):
        return fuse_qkv(*hf, self.num_heads, self.num_groups)

    def to_hf(self, t):
        return split_qkv(t, self.num_heads, self.num_groups)

    def hf_shapes(self, shape):
        d = shape[0] // (self.num_heads + 2 * self.num_groups)
        rest = tuple(shape[1:])
        return [(self.num_heads * d, *rest), (self.num_groups * d, *rest), (self.num_groups * d, *rest)]


@dataclass(frozen=True)
class KV(Op):
    num_groups: int
    n_hf = 2

    def to_mcore(self, hf):
        return fuse_kv(*hf, self.num_groups)

    def to_hf(self, t):
        return split_kv(t, self.num_groups)

    def hf_shapes(self, shape):
        return [(shape[0] // 2, *shape[1:])] * 2


@dataclass(frozen=True)
class GateUp(Op):
    n_hf = 2

    def to_mcore(self, hf):
        return fuse_gate_up(*hf)

    def to_hf(self, t):
        return split_gate_up(t)

    def hf_shapes(self, shape):
        return [(shape[0] // 2, *shape[1:])] * 2


@dataclass(frozen=True)
class PadRows(Op):
    """HF ``[hf_rows, ...]`` <-> Megatron ``[mcore_rows, ...]`` (extra rows zero; trimmed on export)."""
    hf_rows: int
    mcore_rows: int

    def to_mcore(self, hf):
        t = hf[0]
        if t.shape[0] != self.hf_rows:
            raise ConversionError(f"expected {self.hf_rows} rows, found {t.shape[0]}")
        if self.mcore_rows == self.hf_rows:
            return t
        if self.mcore_rows < self.hf_rows:
            raise ConversionError(f"cannot shrink {self.hf_rows} rows to {self.mcore_rows}")
        pad = t.new_zeros(self.mcore_rows - self.hf_rows, *t.shape[1:])
        return torch.cat([t, pad])

    def to_hf(self, t):
        return (t[:self.hf_rows],)

    def hf_shapes(self, shape):
        return [(self.hf_rows, *shape[1:])]


@dataclass(frozen=True)
class Reshape(Op):
    hf_shape: tuple
    mcore_shape: tuple

    def to_mcore(self, hf):
        return hf[0].reshape(self.mcore_shape)

    def to_hf(self, t):
        return (t.reshape(self.hf_shape),)

    def hf_shapes(self, shape):
        return [tuple(self.hf_shape)]


IDENTITY = Identity()
GATE_UP = GateUp()


# ------------------------------------------------------------------------------------------------
# Rules (templates) and pairs (concrete keys)
# ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Pair:
    mcore: str
    hf: tuple[str, ...]
    op: Op = IDENTITY


@dataclass(frozen=True)
class Rule:
    """``mcore`` / ``hf`` templates; ``{i}`` is the Megatron layer index and ``{j}`` the HF one."""
    mcore: str
    hf: tuple[str, ...] | str
    op: Op | Callable[[dict], Op] = IDENTITY

    def hf_keys(self) -> tuple[str, ...]:
        return (self.hf,) if isinstance(self.hf, str) else tuple(self.hf)


def expand(rules: Iterable[Rule], layers: Iterable[int | tuple[int, int]] = (None,),
           mcore_prefix: str = "", hf_prefix: str = "", **fmt) -> list[Pair]:
    """Concrete pairs for each layer (``i`` or ``(i, j)`` = Megatron and HF layer indices).

    ``fmt`` fills other template fields. Pass ``layers=(None,)`` for rules without ``{i}``.
    """
    out = []
    for layer in layers:
        i, j = (layer, layer) if not isinstance(layer, tuple) else layer
        for r in rules:
            out.append(Pair(mcore_prefix + r.mcore.format(i=i, j=j, **fmt),
                            tuple(hf_prefix + k.format(i=i, j=j, **fmt) for k in r.hf_keys()),
                            r.op))
    return out


def check_pairs(pairs: Sequence[Pair]) -> None:
    """No Megatron or HF key may appear twice."""
    seen_m, seen_h = set(), set()
    for p in pairs:
        if p.mcore in seen_m:
            raise ConversionError(f"key map error: megatron key {p.mcore} mapped twice")
        seen_m.add(p.mcore)
        if len(p.hf) != p.op.n_hf:
            raise ConversionError(f"key map error: {p.mcore}: op {type(p.op).__name__} takes "
                                  f"{p.op.n_hf} HF tensors, got {len(p.hf)}")
        for k in p.hf:
            if k in seen_h:
                raise ConversionError(f"key map error: HF key {k} mapped twice")
            seen_h.add(k)


def key_report(kind: str, missing: Iterable[str], unexpected: Iterable[str], limit: int = 20) -> str:
    """One summary line plus the offending keys (``limit`` of each)."""
    missing, unexpected = sorted(missing), sorted(unexpected)
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected")
    lines = [f"{kind}: {' and '.join(parts)} key(s)"]
    for name, keys in (("missing", missing), ("unexpected", unexpected)):
        for k in keys[:limit]:
            lines.append(f"  {name}: {k}")
        if len(keys) > limit:
            lines.append(f"  ... and {len(keys) - limit} more {name}")
    return "\n".join(lines)


def cast(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return t if dtype is None or t.dtype == dtype else t.to(dtype)


def hf_to_mcore(pairs: Sequence[Pair], get_hf: Callable[[str], torch.Tensor],
                dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Stream ``(megatron key, tensor)``: reads only the HF tensors of one pair at a time."""
    for p in pairs:
        yield p.mcore, cast(p.op.to_mcore([get_hf(k) for k in p.hf]), dtype)


def mcore_to_hf(pairs: Sequence[Pair], get_mcore: Callable[[str], torch.Tensor],
                dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    for p in pairs:
        for k, t in zip(p.hf, p.op.to_hf(get_mcore(p.mcore))):
            yield k, cast(t, dtype)


def replace(pair: Pair, **kw) -> Pair:
    return dataclasses.replace(pair, **kw)
