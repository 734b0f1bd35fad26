"""The one conversion engine: applies a key-map table (`infllava_jax.keymap.Row`s) in either
direction, lazily, one tensor (or one slice of one) at a time.

Import (PyTorch -> ours): `import_plan(rows, tensors, abstract)` checks the table against the
model (every leaf covered exactly once) and the checkpoint (every key present, every shape
right, every key used or explicitly ignored) before anything is read, and returns one `Leaf`
per parameter. A Leaf reads any region of our parameter from the torch tensors behind it:
the layers of a scanned stack are filled one by one into a preallocated buffer of the region,
transposes and the dtype cast happen in that single copy. The plan is then
    - written to disk without ever holding the model (`infllava_jax.checkpoint.save_checkpoint`
      streams `StreamedArray` leaves chunk by chunk),
    - or placed on devices (`to_jax`: each shard reads only its own slice),
    - or materialised as numpy (`to_numpy`, small models and tests).
Export (ours -> PyTorch): `export_plan(rows, leaves)` gives one lazy `TorchTensor` per key.
"""
from __future__ import annotations

import fnmatch
from typing import Any, Callable, Iterable, Mapping

import jax
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from convert.errors import MissingKeysError, ShapeMismatchError, UnexpectedKeysError, listing
from convert.sources import ArrayTensor, Tensor, ranges
from infllava_jax.checkpoint import StreamedArray
from infllava_jax.keymap import Row


def _check_coverage(rows: Iterable[Row], paths: Iterable[str], what: str) -> dict[str, Row]:
    by_path: dict[str, Row] = {}
    for r in rows:
        if r.path in by_path:
            raise ValueError(f"key map: two rows for {r.path} ({by_path[r.path].key}, {r.key})")
        by_path[r.path] = r
    paths = set(paths)
    no_row, no_leaf = sorted(paths - set(by_path)), sorted(set(by_path) - paths)
    if no_row or no_leaf:
        raise ValueError(f"key map does not match the {what}: no row for [{listing(no_row)}]; "
                         f"rows for unknown parameters [{listing(no_leaf)}]")
    return by_path


TRANSPOSE_BLOCK = 64   # rows per block of a blocked 2-D transpose (3x numpy's naive one here)


def copy_permuted(out: np.ndarray, src: np.ndarray, perm: tuple[int, ...] | None) -> None:
    """out[...] = src.transpose(perm), cast to out.dtype, in one pass. 2-D transposes go in
    blocks of TRANSPOSE_BLOCK source rows (cache friendly); same-dtype copies run on an
    unsigned-int view (numpy then releases the GIL, so tensorstore's threads keep compressing)."""
    if src.dtype == out.dtype and src.dtype.itemsize in (1, 2, 4, 8):
        view = np.dtype(f"u{src.dtype.itemsize}")
        src, out = src.view(view), out.view(view)
    if perm is None:
        np.copyto(out, src, casting="unsafe")
    elif perm == (1, 0):
        for i in range(0, src.shape[0], TRANSPOSE_BLOCK):
            np.copyto(out[:, i:i + TRANSPOSE_BLOCK], src[i:i + TRANSPOSE_BLOCK].T, casting="unsafe")
    else:
        np.copyto(out, src.transpose(perm), casting="unsafe")


def _torch_index(row: Row, ours: list[tuple[int, int]]) -> tuple[slice, ...]:
    """Region of one torch tensor that holds the region `ours` (per-tensor axes) of our leaf."""
    if row.perm is None:
        return tuple(slice(a, b) for a, b in ours)
    out = [None] * len(ours)
    for j, p in enumerate(row.perm):   # our axis j is torch axis perm[j]
        out[p] = slice(*ours[j])
    return tuple(out)


# ----------------------------------------------------------------------------- import

class Leaf(StreamedArray):
    """Our parameter `path`, read through `row` from `tensors` (one, or one per layer)."""

    def __init__(self, path: str, shape, dtype, row: Row, tensors: list[Tensor]):
        self.path, self.shape, self.dtype, self.row, self.tensors = path, tuple(shape), np.dtype(dtype), row, tensors
        # stream along the layer axis, else along the axis that is torch's leading (contiguous) one
        self.chunk_axis = 0 if row.layers is not None or row.perm is None else row.perm.index(0)

    def __repr__(self):
        return f"Leaf({self.path}, {self.shape}, {self.dtype.name}, <- {self.row.key})"

    check: Callable[[Tensor, str, np.ndarray], None] | None = None   # sees every piece read (nonfinite.py)

    def _fill(self, out: np.ndarray, i: int, region: list[tuple[int, int]]) -> None:
        src = self.tensors[i].read(_torch_index(self.row, region))
        if self.check is not None:
            self.check(self.tensors[i], self.row.keys()[i], src)
        copy_permuted(out, src, self.row.perm)

    def read(self, index=None) -> np.ndarray:
        r = ranges(index, self.shape)
        out = np.empty(tuple(b - a for a, b in r), self.dtype)
        if self.row.layers is None:
            self._fill(out, 0, r)
        else:   # one layer at a time into the preallocated region
            (a, b), rest = r[0], r[1:]
            for layer in range(a, b):
                self._fill(out[layer - a], layer, rest)
        return out


def import_plan(rows: Iterable[Row], tensors: Mapping[str, Tensor], abstract, *,
                claim: Callable[[str], bool] | None = None, ignore: Iterable[str] = (),
                what: str = "checkpoint") -> dict[str, Leaf]:
    """{our path: Leaf}. `abstract`: our tree of ShapeDtypeStruct (target shapes and dtypes).

    Raises MissingKeysError (every missing key), ShapeMismatchError (key, checkpoint shape,
    expected torch shape, our leaf), UnexpectedKeysError (claimed keys that nothing uses and no
    `ignore` glob pattern matches; `claim(key)` says which keys this table answers for,
    default: all)."""
    specs = flatten_dict(abstract, sep="/")
    by_path = _check_coverage(rows, specs, "model")
    ignore = tuple(ignore)
    missing, bad, used, plan = [], [], set(), {}
    for path, row in by_path.items():
        spec = specs[path]
        if row.layers is not None and (not spec.shape or spec.shape[0] != row.layers):
            raise ValueError(f"key map: {row.key} stacks {row.layers} layers into {path} of shape {spec.shape}")
        want = row.torch_shape(spec.shape)
        found = []
        for key in row.keys():
            t = tensors.get(key)
            if t is None:
                missing.append(key)
                continue
            used.add(key)
            if tuple(t.shape) != want:
                bad.append(f"{key}: shape {tuple(t.shape)} in the {what}, expected {want} "
                           f"(for {path} {tuple(spec.shape)})")
            found.append(t)
        plan[path] = Leaf(path, spec.shape, spec.dtype, row, found)
    if missing:
        raise MissingKeysError(f"missing key(s) in the {what}: {listing(missing)}")
    if bad:
        raise ShapeMismatchError(f"wrong shape(s): {'; '.join(bad[:4])}"
                                 + (f"; ... ({len(bad)} total)" if len(bad) > 4 else ""))
    extra = sorted(k for k in tensors if k not in used and (claim is None or claim(k))
                   and not any(fnmatch.fnmatchcase(k, p) for p in ignore))
    if extra:
        raise UnexpectedKeysError(f"unexpected key(s) in the {what} that nothing converts: {listing(extra)}")
    return plan


def to_numpy(plan: Mapping[str, Leaf]) -> dict:
    """The whole tree as numpy arrays (small models, tests)."""
    return unflatten_dict({p: leaf.read() for p, leaf in plan.items()}, sep="/")


def to_jax(plan: Mapping[str, Leaf], shardings) -> dict:
    """jax.Arrays created shard by shard on `shardings` (a tree like the params, or one
    sharding for all): each device's callback reads only its slice (replicas read it once)."""
    flat_sh = flatten_dict(shardings, sep="/") if isinstance(shardings, Mapping) else None
    out = {}
    for path, leaf in plan.items():
        cache: dict = {}

        def shard(index, leaf=leaf, cache=cache):
            key = tuple(ranges(index, leaf.shape))
            if key not in cache:
                cache[key] = leaf.read(index)
            return cache[key]

        sharding = flat_sh[path] if flat_sh is not None else shardings
        out[path] = jax.make_array_from_callback(leaf.shape, sharding, shard, dtype=leaf.dtype)
    return unflatten_dict(out, sep="/")


# ----------------------------------------------------------------------------- export

class TorchTensor(Tensor):
    """One torch tensor of an export, computed from our leaf (slice `layer` of a stack)."""

    def __init__(self, key: str, row: Row, leaf: Tensor, layer: int | None, dtype=None):
        self.key, self.row, self.leaf, self.layer = key, row, leaf, layer
        self.shape = row.torch_shape(leaf.shape)
        self.dtype = np.dtype(dtype if dtype is not None else leaf.dtype)
        self.where = f"our {row.path}" + ("" if layer is None else f"[{layer}]")

    def read(self, index=None) -> np.ndarray:
        r = ranges(index, self.shape)
        perm = self.row.perm
        ours = r if perm is None else [r[p] for p in perm]           # our axis j = torch axis perm[j]
        if self.layer is not None:
            ours = [(self.layer, self.layer + 1)] + list(ours)
        src = self.leaf.read(tuple(slice(a, b) for a, b in ours))
        if self.layer is not None:
            src = src[0]
        inv = None if perm is None else tuple(int(j) for j in np.argsort(perm))
        out = np.empty(tuple(b - a for a, b in r), self.dtype)
        copy_permuted(out, src, inv)
        return out


def export_plan(rows: Iterable[Row], leaves: Mapping[str, Any], *, dtype=None) -> dict[str, TorchTensor]:
    """{torch key: TorchTensor} from our leaves ({path: Tensor-like or array}); every leaf must be
    covered by exactly one row. dtype: of every exported tensor (None: the leaf's)."""
    leaves = {p: (v if isinstance(v, Tensor) else ArrayTensor(v, where=p)) for p, v in leaves.items()}
    by_path = _check_coverage(rows, leaves, "parameters")
    out = {}
    for path, row in by_path.items():
        for i, key in enumerate(row.keys()):
            out[key] = TorchTensor(key, row, leaves[path], None if row.layers is None else i, dtype)
    return out


# ----------------------------------------------------------------------------- in memory

def from_torch(rows: Iterable[Row], state_dict: Mapping[str, Any], abstract, *, prefix: str = "",
               strict: bool = True, ignore: Iterable[str] = ()) -> dict:
    """One module's params (numpy, shapes/dtypes of `abstract`) from an in-memory state dict
    (numpy / torch / jax values) whose keys are `prefix + row key`. strict: keys under `prefix`
    that nothing converts (and no `ignore` glob matches) are an error; other keys are not ours."""
    from infllava_jax.keymap import prefixed
    claim = (lambda k: k.startswith(prefix)) if strict else (lambda k: False)
    tensors = {k: ArrayTensor(v, where=k) for k, v in state_dict.items()}
    return to_numpy(import_plan(prefixed(rows, "", prefix), tensors, abstract, claim=claim, ignore=ignore,
                                what="state dict"))


def to_torch(rows: Iterable[Row], params, *, prefix: str = "", dtype=None) -> dict[str, np.ndarray]:
    """Inverse of `from_torch`: {prefix + torch key: numpy array in torch layout}."""
    from infllava_jax.keymap import prefixed
    return {k: t.read() for k, t in export_plan(prefixed(rows, "", prefix), flatten_dict(params, sep="/"), dtype=dtype).items()}
