"""Weight-only quantization of the language model's projections with qwix (post-training, PTQ).

`LlamaConfig.quant` names the setting: "int8" (one scale per output channel), "int4" (one scale
per output channel and per 128 input rows: sub-channel, tile 128; a model whose input widths 128
does not divide takes the largest tile dividing 128 and them, e.g. 32 for the tiny preset), or
either with an explicit tile, "int8/64", "int4/32" (it must divide every target's input width). The targets are the
decoder's seven projections and the untied `lm_head` (`TARGETS`); embeddings, norms, the
projector, the DEM and the vision tower stay in their dtype (the tower is 0.3 B of the 8 B model's
weights and runs once per image).

qwix intercepts the `jax.lax.dot_general` of every target (`wrap`): a quantized kernel leaf is a
`WithAux(QArray(qvalue, scale))` in the parameter tree, its `how` (qtype, channel / tile axes)
static. `quantize_tree` turns the float parameters of a model into that tree (stacked layers:
each layer's slice quantized on its own, as qwix sees it inside the scan).
"""
from __future__ import annotations

import contextlib
import functools
import math

import jax
import qwix
from flax.traverse_util import flatten_dict, unflatten_dict
from qwix._src.providers.ptq import WithAux

QTYPES = ("int8", "int4")
DEFAULT_TILE = {"int8": None, "int4": 128}
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head")


def parse(spec: str) -> tuple[str, int | None]:
    """"int8" | "int4" | "int8/TILE" | "int4/TILE" -> (qtype, tile or None: per channel)."""
    qtype, _, tile = str(spec).partition("/")
    if qtype not in QTYPES or (tile and not (tile.isdigit() and int(tile) > 0)):
        raise ValueError(f"quant={spec!r}; expected one of {QTYPES}, optionally with a tile: 'int4/64'")
    return qtype, int(tile) if tile else DEFAULT_TILE[qtype]


def tile_size(spec: str, widths: tuple[int, ...] = ()) -> int | None:
    """The sub-channel tile of `spec` (None: per channel) for targets of input widths `widths`:
    an explicit tile as given, the default one reduced to a divisor of every width."""
    qtype, tile = parse(spec)
    return tile if tile is None or "/" in str(spec) else math.gcd(tile, *widths)


def rules(spec: str, widths: tuple[int, ...] = ()) -> list[qwix.QtRule]:
    """One qwix rule: weights of the target projections in `spec`'s qtype, activations untouched."""
    return [qwix.QtRule(module_path=rf"(.*/)?({'|'.join(TARGETS)})", op_names=("dot_general",),
                        weight_qtype=parse(spec)[0], tile_size=tile_size(spec, widths))]


def wrap(module, spec: str | None, widths: tuple[int, ...] = ()):
    """`module` with its target projections (input widths `widths`) quantized as `spec` says
    (itself when spec is None). Call inside a parent's setup: qwix's copy keeps that parent."""
    if spec is None:
        return module
    return qwix.quantize_model(module, qwix.PtqProvider(rules(spec, widths)))


def is_quantized(leaf) -> bool:
    return isinstance(leaf, WithAux)


_AS_ACCELERATOR = [False]


def held(q: qwix.QArray) -> qwix.QArray:
    """The QArray as this backend holds it: on CPU an int4 qvalue is stored in int8 (the same
    values; qtype stays int4). XLA:CPU's ahead-of-time executables (eval's generator, the train
    loop) expect int4 arguments packed, which no other CPU program makes them. Works on arrays
    and on shapes (ShapeDtypeStruct); not under `as_accelerator()`."""
    v = q.qvalue
    if v.dtype != jax.numpy.int4 or jax.default_backend() != "cpu" or _AS_ACCELERATOR[0]:
        return q
    if isinstance(v, jax.ShapeDtypeStruct):
        return q.replace(qvalue=jax.ShapeDtypeStruct(v.shape, jax.numpy.int8, sharding=v.sharding))
    return q.replace(qvalue=v.astype(jax.numpy.int8))


def hold(tree):
    """`tree` (parameters or their shapes) with every quantized kernel as this backend holds it (`held`)."""
    return jax.tree.map(lambda x: x.replace(array=held(x.array)) if is_quantized(x) else x, tree, is_leaf=is_quantized)


@contextlib.contextmanager
def as_accelerator():
    """Shapes and programs as a GPU/TPU holds int4 (packed, half a byte), also on CPU: for what is
    compiled to be measured, not run (the plan's memory)."""
    saved, _AS_ACCELERATOR[0] = _AS_ACCELERATOR[0], True
    try:
        yield
    finally:
        _AS_ACCELERATOR[0] = saved


def _quantize(w: jax.Array, how) -> qwix.QArray:
    """One kernel [..., in, out] -> QArray; leading (stacked-layer) axes quantized slice by slice."""
    fn = functools.partial(qwix.quantize, qtype=how.qtype, channelwise_axes=how.channelwise_axes,
                           tiled_axes=how.tiled_axes, calibration_method=how.calibration_method)
    for _ in range(w.ndim - 2):
        fn = jax.vmap(fn)
    return held(fn(w))


def quantize_tree(params: dict, like: dict) -> dict:
    """Float `params` -> the tree of the quantized config whose abstract params are `like`
    (`params.abstract_params(config)`): target kernels become WithAux(QArray), the rest is kept.
    Jit it (with the quantized config's shardings) to quantize in place of a copy."""
    flat = flatten_dict(params)
    out = {}
    for path, spec in flatten_dict(like).items():
        w = flat[path]
        out[path] = spec.replace(array=_quantize(w, spec.how)) if is_quantized(spec) else w
    return unflatten_dict(out)


def dequantize_tree(params: dict, like: dict) -> dict:
    """Inverse direction (lossy): every WithAux leaf back to a float array of `like`'s dtype
    (`like`: the abstract params of the unquantized config)."""
    flat, like = flatten_dict(params), flatten_dict(like)
    return unflatten_dict({p: (qwix.dequantize(v.array) if is_quantized(v) else v).astype(like[p].dtype)
                           for p, v in flat.items()})


def to_saved(tree):
    """The checkpoint's form of a (possibly quantized) tree: each WithAux leaf as a plain dict
    {"qvalue", "scale"} (what orbax writes and reads by key); other leaves unchanged."""
    return jax.tree.map(lambda x: {"qvalue": x.array.qvalue, "scale": x.array.scale} if is_quantized(x) else x,
                        tree, is_leaf=is_quantized)


def from_saved(tree, like):
    """Inverse of `to_saved`, the static parts (qtype, how) from `like` (abstract params of the
    same config): a quantized checkpoint reloads without quantizing again."""
    def back(spec, x):
        return spec.replace(array=held(spec.array.replace(qvalue=x["qvalue"], scale=x["scale"]))) if is_quantized(spec) else x
    return jax.tree.map(back, like, tree, is_leaf=is_quantized)


def weight_bytes(tree) -> int:
    """Bytes of every array leaf of `tree` (abstract or real); an int4 value counts half a byte."""
    return sum(int(x.size) * jax.dtypes.itemsize_bits(x.dtype) // 8 for x in jax.tree.leaves(tree))
