"""Key maps: our parameter tree <-> PyTorch state-dict keys, as data.

Every module that has PyTorch weights (vision.py, llama.py, dem.py, projector.py) exposes
`key_map(config) -> list[Row]` for one config; `convert/engine.py` applies such a table in
both directions, streaming tensor by tensor. One row per tensor family:

    Row(path="encoder/layers/self_attn/q_proj/kernel",      ours, '/'-joined, module-relative
        key="encoder.layers.{i}.self_attn.q_proj.weight",   PyTorch, relative to the module
        transform="transpose",                              torch -> ours, a name in TRANSFORMS
        layers=24)                                          stacked over 24 layers, or None

`layers=None`: one tensor <-> one leaf. `layers=n`: the n tensors `key.format(i=i)` are the
slices [i] of one leaf with a leading layer axis (scanned layers). An unscanned config gives
n plain rows (`.../layers_{i}/...` <-> `...layers.{i}...`) instead, so a table describes one
config exactly. Shapes are not in the table: they come from the model (`abstract_params`),
and the engine checks that a table covers every leaf of the tree exactly once.

Transforms are axis permutations, hence exactly invertible:
    ours  = numpy.transpose(torch, perm)
    torch = numpy.transpose(ours, argsort(perm))
"""
from __future__ import annotations

import dataclasses
from typing import Iterable, Sequence

import numpy as np

TRANSFORMS: dict[str, tuple[int, ...] | None] = {
    "none": None,
    "transpose": (1, 0),      # torch Linear weight [out, in] -> kernel [in, out]
    "conv": (2, 3, 1, 0),     # torch Conv2d weight [out, in, kh, kw] -> kernel [kh, kw, in, out]
}


@dataclasses.dataclass(frozen=True)
class Row:
    path: str
    key: str
    transform: str = "none"
    layers: int | None = None

    def __post_init__(self):
        if self.transform not in TRANSFORMS:
            raise ValueError(f"Row {self.key!r}: transform {self.transform!r}; expected one of {sorted(TRANSFORMS)}")
        if (self.layers is not None) != ("{i}" in self.key):
            raise ValueError(f"Row {self.key!r}: a per-layer key template ('{{i}}') goes with layers=n")

    @property
    def perm(self) -> tuple[int, ...] | None:
        return TRANSFORMS[self.transform]

    def keys(self) -> list[str]:
        """The torch keys of this row, in layer order."""
        return [self.key] if self.layers is None else [self.key.format(i=i) for i in range(self.layers)]

    def torch_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        """Shape of one torch tensor of this row, given our leaf shape."""
        shape = tuple(shape[1:] if self.layers is not None else shape)
        return shape if self.perm is None else tuple(shape[j] for j in np.argsort(self.perm))

    def prefixed(self, path_prefix: str = "", key_prefix: str = "") -> "Row":
        return dataclasses.replace(self, path=path_prefix + self.path, key=key_prefix + self.key)


def prefixed(rows: Iterable[Row], path_prefix: str = "", key_prefix: str = "") -> list[Row]:
    """A module's table placed under `path_prefix` (ours) and `key_prefix` (torch)."""
    return [r.prefixed(path_prefix, key_prefix) for r in rows]


def stack(rows: Iterable[tuple[str, str, str]], n: int, *, scanned: bool, path: str, key: str) -> list[Row]:
    """Rows of one layer of a stack, (sub-path, sub-key, transform), for all n layers.

    path/key: where the stack lives (e.g. "encoder/layers", "encoder.layers"): scanned layers are
    one leaf per row under `path` with a leading layer axis; unscanned ones live under
    `path_{i}` (layers.layer_stack's names)."""
    rows = list(rows)
    if scanned:
        return [Row(f"{path}/{p}", f"{key}.{{i}}.{k}", t, n) for p, k, t in rows]
    return [Row(f"{path}_{i}/{p}", f"{key}.{i}.{k}", t) for i in range(n) for p, k, t in rows]


def linear(path: str, key: str, bias: bool = True) -> list[tuple[str, str, str]]:
    """(path, key, transform) of a torch Linear: kernel <- weight^T, bias <- bias."""
    out = [(f"{path}/kernel", f"{key}.weight", "transpose")]
    return out + [(f"{path}/bias", f"{key}.bias", "none")] if bias else out


def norm(path: str, key: str, bias: bool = True) -> list[tuple[str, str, str]]:
    """(path, key, transform) of a torch LayerNorm / RMSNorm: scale <- weight, bias <- bias."""
    out = [(f"{path}/scale", f"{key}.weight", "none")]
    return out + [(f"{path}/bias", f"{key}.bias", "none")] if bias else out


def rows(entries: Iterable[tuple[str, str, str]]) -> list[Row]:
    return [Row(p, k, t) for p, k, t in entries]
