"""Building blocks shared by every module: logically-partitioned layers and the layer stack.

Every parameter is created with logical axis names (`embed`, `mlp`, `heads`, `kv_heads`,
`vocab`, `layers`, ...); `sharding.py` maps them to mesh axes with one rules table.
Parameter leaves keep Flax names (`kernel` [in, out], `bias`, `scale`, `embedding`);
module names follow Hugging Face (`q_proj`, `layer_norm1`, `fc1`, ...), so converting a
PyTorch state dict is a key map plus transposes.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
LAYERS = "layers"  # logical name of the scanned layer axis

# Names of the decoder layer's projection outputs (jax.ad_checkpoint.checkpoint_name tags in
# llama.py, MaxText's names): what the named remat policies below keep for the backward pass.
ATTENTION_NAMES = ("query_proj", "key_proj", "value_proj", "out_proj")
MLP_NAMES = ("mlpwi_0", "mlpwi_1", "mlpwo")
_save = jax.checkpoint_policies.save_only_these_names

# Named remat policies (config field `remat_policy`), from the most memory to the least:
# "none" keeps every activation, "full" none (the layer's forward runs again in the backward).
# The named ones keep the tagged projection outputs of each decoder layer and recompute the rest
# (norms, RoPE, attention scores, SiLU); in the vision tower and the DEM (no tags) they are "full".
REMAT_POLICIES: dict[str, Callable | None] = {
    "none": None,  # no rematerialisation
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "offload_dots": jax.checkpoint_policies.offload_dot_with_no_batch_dims("device", "pinned_host"),
    "save_qkv_proj": _save(*ATTENTION_NAMES[:3]),
    "save_attention": _save(*ATTENTION_NAMES),
    "save_mlp": _save(*MLP_NAMES),
    "minimal": _save(*ATTENTION_NAMES, *MLP_NAMES),   # every projection output
}


class Dense(nn.Dense):
    """nn.Dense applied to the rows of a matrix: (..., in) is flattened to (rows, in) first.

    Same parameters and result; what changes is the weight gradient x^T dy, which then contracts
    one axis instead of two (batch and length). XLA:CPU lowers the two-axis contraction through
    transposing copies of x and dy; one axis is one GEMM, as in PyTorch (benchmarks/train_step.py)."""

    def __call__(self, inputs):
        y = super().__call__(inputs.reshape(-1, inputs.shape[-1]))
        return y.reshape(*inputs.shape[:-1], y.shape[-1])


def dense(features: int, axes: tuple[str | None, str | None], *, name: str, use_bias: bool = True,
          dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
          kernel_init: Callable = nn.initializers.lecun_normal()) -> nn.Dense:
    """Dense whose kernel carries logical names `axes` = (in, out) and bias (out,)."""
    return Dense(
        features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, name=name,
        kernel_init=nn.with_logical_partitioning(kernel_init, axes),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), axes[-1:]))


def layer_norm(eps: float, *, name: str, dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32) -> nn.LayerNorm:
    """nn.LayerNorm (scale, bias over the last axis, logical name `norm`); stats in fp32."""
    return nn.LayerNorm(
        epsilon=eps, dtype=dtype, param_dtype=param_dtype, name=name,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("norm",)))


LAYER_LOOPS = ("auto", "scan", "unroll")


def unroll_layers(layer_loop: str) -> bool:
    """Whether a stacked (`scan_layers=True`) layer stack runs unrolled: `layer_loop` "unroll",
    or "auto" on CPU. XLA:CPU runs a scanned stack 25% slower than the same layers unrolled
    (a small Llama's forward + backward, benchmarks/train_step.py): dynamic slices of the stacked
    weights, dynamic updates of the stacked residuals, zero-filled gradient accumulators."""
    if layer_loop not in LAYER_LOOPS:
        raise ValueError(f"layer_loop={layer_loop!r}; expected one of {LAYER_LOOPS}")
    return layer_loop == "unroll" or (layer_loop == "auto" and jax.default_backend() == "cpu")


def layer_stack(parent_block: type[nn.Module], length: int, *, scan: bool, remat_policy: str,
                name: str = LAYERS, unroll: bool = False, **block_kwargs):
    """`length` copies of `parent_block`, applied as `carry, ys = stack(carry, xs, bcast)`.

    The block is called `block(carry, xs_i, bcast) -> (carry, ys_i)`: `xs` are per-layer
    inputs with a leading layer axis (e.g. a KV cache, or None), `bcast` is shared by all
    layers (masks, positions). Unrolled or unscanned stacks also take `xs` as a list (layer i's
    inputs are xs[i]) and then return `ys` as a list: nothing is sliced or stacked (a KV cache
    carried through a decode loop is updated in place, `llama.init_cache`).
    With `scan=True` the parameters are stacked along a leading `layers` axis under `name`;
    otherwise they live under `name_0`, `name_1`, ... and the result is identical
    (`stack_layer_params` / `unstack_layer_params` convert the trees).
    `unroll` (with `scan=True`, not at init): the same stacked parameters, the layers run one
    after the other (`unroll_layers`). Must be called inside a compact method or setup of the parent.
    """
    if remat_policy not in REMAT_POLICIES:
        raise ValueError(f"remat_policy={remat_policy!r}; expected one of {sorted(REMAT_POLICIES)}")
    block = parent_block
    if REMAT_POLICIES[remat_policy] is not None:
        block = nn.remat(block, policy=REMAT_POLICIES[remat_policy], prevent_cse=unroll or not scan)
    if scan and unroll:
        mapped = nn.map_variables(_Unrolled, "params", trans_in_fn=functools.partial(_per_layer, length))
        return mapped(block=block, length=length, block_kwargs=block_kwargs, name=name)
    if scan:
        scanned = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                          in_axes=(0, nn.broadcast), out_axes=0, length=length,
                          metadata_params={nn.PARTITION_NAME: LAYERS})
        return scanned(**block_kwargs, name=name)

    layers = [block(**block_kwargs, name=f"{name}_{i}") for i in range(length)]

    def run(carry, xs, bcast):
        ys = []
        for i, layer in enumerate(layers):
            carry, y = layer(carry, _layer_inputs(xs, i), bcast)
            ys.append(y)
        return carry, _layer_outputs(xs, ys)

    return run


def _layer_inputs(xs, i: int):
    """Layer i's inputs: xs[i] of a per-layer list, else the i-th slice of every leaf."""
    return xs[i] if isinstance(xs, list) else jax.tree.map(lambda a: a[i], xs)


def _layer_outputs(xs, ys: list):
    """The layers' outputs as their inputs came: a per-layer list, or stacked on a leading axis."""
    return ys if isinstance(xs, list) else jax.tree.map(lambda *a: jnp.stack(a), *ys)


class _Unrolled(nn.Module):
    """`length` blocks named "0", "1", ... run in a Python loop (layer_stack's calling convention)."""
    block: Any
    length: int
    block_kwargs: Any

    @nn.compact
    def __call__(self, carry, xs, bcast):
        ys = []
        for i in range(self.length):
            carry, y = self.block(**self.block_kwargs, name=str(i))(carry, _layer_inputs(xs, i), bcast)
            ys.append(y)
        return carry, _layer_outputs(xs, ys)


def _per_layer(length: int, variables: dict) -> dict:
    """Stacked variables (leading `layers` axis; boxed leaves lose that axis name) -> {"i": layer i}.
    One split per leaf: its gradient is one concatenation (slices would each pad to the stack)."""
    is_box = lambda x: isinstance(x, nn.Partitioned)
    split = lambda a: [p[0] for p in jnp.split(a, length)]
    unbox = lambda x: ([x.replace(value=p, names=x.names[1:]) for p in split(x.value)] if is_box(x) else split(x))
    parts = {col: jax.tree.map(unbox, tree, is_leaf=is_box) for col, tree in variables.items()}
    is_parts = lambda x: isinstance(x, list)
    return {col: {str(i): jax.tree.map(lambda p: p[i], t, is_leaf=is_parts) for i in range(length)}
            for col, t in parts.items()}


def unstack_layer_params(tree: dict, name: str = LAYERS) -> dict:
    """Scanned params (`name` with leading layer axis) -> unscanned (`name_0`, `name_1`, ...)."""
    out = {}
    for k, v in tree.items():
        if k == name:
            n = jax.tree.leaves(v)[0].shape[0]
            for i in range(n):
                out[f"{name}_{i}"] = jax.tree.map(lambda a: a[i], v)
        elif isinstance(v, dict):
            out[k] = unstack_layer_params(v, name)
        else:
            out[k] = v
    return out


def stack_layer_params(tree: dict, name: str = LAYERS) -> dict:
    """Inverse of `unstack_layer_params`."""
    out, per_layer = {}, {}
    for k, v in tree.items():
        prefix, _, idx = k.rpartition("_")
        if prefix == name and idx.isdigit():
            per_layer[int(idx)] = v
        elif isinstance(v, dict):
            out[k] = stack_layer_params(v, name)
        else:
            out[k] = v
    if per_layer:
        ordered = [per_layer[i] for i in range(len(per_layer))]
        out[name] = jax.tree.map(lambda *a: jnp.stack(a), *ordered)
    return out

