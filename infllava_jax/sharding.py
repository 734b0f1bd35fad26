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
    # activations
    ("act_batch", ("data", "fsdp")),
    ("act_length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
)


def make_mesh(shape: Mapping[str, int] | None = None, devices=None) -> Mesh:
    """Mesh over (data, fsdp, tensor); unnamed axes are 1, `fsdp` defaults to all devices."""
    devices = np.asarray(jax.devices() if devices is None else devices)
    shape = dict(shape or {"fsdp": devices.size})
    unknown = set(shape) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"mesh axes {sorted(unknown)}; expected some of {MESH_AXES}")
    dims = tuple(int(shape.get(a, 1)) for a in MESH_AXES)
    if int(np.prod(dims)) != devices.size:
        raise ValueError(f"mesh {dict(zip(MESH_AXES, dims))} needs {int(np.prod(dims))} devices, "
                         f"have {devices.size}")
    return Mesh(devices.reshape(dims), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


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
    """Batch arrays: the batch axis over (data, fsdp), everything else replicated."""
    spec = [None] * ndim
    spec[batch_axis] = ("data", "fsdp")
    return NamedSharding(mesh, PartitionSpec(*spec))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())
