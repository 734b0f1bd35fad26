"""Mesh and the one table of logical-axis rules.

Parameters and activations carry logical names (layers.py); this table maps them to the mesh
axes `data`, `fsdp`, `tensor`. A logical name missing from the table is an error, never a
silent replication.
"""
from __future__ import annotations

import logging
from typing import Any, Mapping

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# logical name -> mesh axis (or axes, or None = replicated)
LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    # parameters
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("layers", None),
    ("norm", None),
    ("positions", None),
    ("patch_height", None),
    ("patch_width", None),
    ("channels", None),
    ("lora_rank", None),       # LoRA adapters: A (in, r) and B (r, out) shard like their base's in / out
    # activations
    ("act_batch", ("data", "fsdp")),
    ("act_length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
)
BATCH_AXES: tuple[str, ...] = dict(LOGICAL_RULES)["act_batch"]   # the mesh axes a batch is split over


def data_parallel_size(mesh: Mesh) -> int:
    """Rows a batch is split into: the product of the mesh's BATCH_AXES sizes."""
    return int(np.prod([dict(mesh.shape).get(a, 1) for a in BATCH_AXES]))


def parse_mesh(spec: str | Mapping[str, int] | None) -> dict[str, int]:
    """{"data": 2, "fsdp": -1}, "data=2,fsdp=-1" or "data:2+fsdp:-1" (lmms-eval's model_args)
    -> {"data": 2, "fsdp": -1}; None or "" -> {}."""
    if isinstance(spec, Mapping):
        shape = {k: int(v) for k, v in spec.items()}
    else:
        shape = {}
        for part in filter(None, (spec or "").replace("+", ",").split(",")):
            k, _, v = part.replace(":", "=").partition("=")
            try:
                shape[k.strip()] = int(v)
            except ValueError:
                raise ValueError(f"mesh {spec!r}: {part!r} is not AXIS=SIZE with a whole-number size") from None
    unknown = set(shape) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"mesh axes {sorted(unknown)}; expected some of {MESH_AXES}")
    return shape


def make_mesh(spec: str | Mapping[str, int] | None = None, devices=None) -> Mesh:
    """The one way to build a mesh over (data, fsdp, tensor). `spec` as `parse_mesh` reads it:
    unnamed axes are 1, one axis may be -1 (the remaining devices), an empty spec puts every
    device on `fsdp`. A spec that needs fewer devices than `devices` (default: all) takes the
    first ones."""
    devices = np.asarray(jax.devices() if devices is None else devices).reshape(-1)
    shape = parse_mesh(spec) or {"fsdp": -1}
    fixed, rest = int(np.prod([v for v in shape.values() if v != -1])), list(shape.values()).count(-1)
    if rest > 1 or fixed < 1 or (rest and devices.size % fixed):
        raise ValueError(f"mesh {shape} does not fit {devices.size} devices")
    shape = {k: devices.size // fixed if v == -1 else v for k, v in shape.items()}
    dims = tuple(shape.get(a, 1) for a in MESH_AXES)
    n = int(np.prod(dims))
    if n > devices.size:
        raise ValueError(f"mesh {dict(zip(MESH_AXES, dims))} needs {n} devices, have {devices.size}")
    return Mesh(devices[:n].reshape(dims), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def _check_names(logical_specs) -> None:
    known = {name for name, _ in LOGICAL_RULES}
    for spec in jax.tree.leaves(logical_specs, is_leaf=lambda x: isinstance(x, PartitionSpec)):
        for name in spec:
            if name is not None and name not in known:
                raise KeyError(f"logical axis {name!r} has no rule in sharding.LOGICAL_RULES")


def logical_to_shardings(logical_specs, mesh: Mesh, shapes=None):
    """Tree of logical PartitionSpecs -> tree of NamedShardings on `mesh`.

    With `shapes` (a matching tree of arrays / ShapeDtypeStructs), a dimension that the mesh
    axes do not divide (e.g. the 128257-row vocabulary over `tensor`) stays replicated, and
    each such case is logged with its path: never a silent change, never a compile error.
    """
    _check_names(logical_specs)
    shardings = nn.logical_to_mesh_sharding(logical_specs, mesh, LOGICAL_RULES)
    if shapes is None:
        return shardings

    def fit(path, sh, x):
        spec = list(sh.spec) + [None] * (len(x.shape) - len(sh.spec))
        for d, axes in enumerate(spec):
            size = int(np.prod([mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes or ())]))
            if size > 1 and x.shape[d] % size:
                logging.warning("sharding: %s dim %d (size %d) is not divisible by mesh axes %s (%d); "
                                "replicated along it", jax.tree_util.keystr(path), d, x.shape[d], axes, size)
                spec[d] = None
        return NamedSharding(mesh, PartitionSpec(*spec))

    return jax.tree_util.tree_map_with_path(fit, shardings, shapes)


def batch_sharding(mesh: Mesh, ndim: int, batch_axis: int = 0) -> NamedSharding:
    """Batch arrays: the batch axis over BATCH_AXES (data, fsdp), everything else replicated."""
    spec = [None] * ndim
    spec[batch_axis] = BATCH_AXES
    return NamedSharding(mesh, PartitionSpec(*spec))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())
