"""The parameters of a config: their shapes, logical axes and shardings, created from shapes
(nothing allocated twice), random initialisation in place, and restoring parts of a checkpoint.

The library's own modules (training/, lora, convert/) use these; `api.InfLlava` is the user-facing
facade on top.
"""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from infllava_jax import lora, quant, sharding as sharding_lib
from infllava_jax.checkpoint import load_part
from infllava_jax.config import InfLlavaConfig
from infllava_jax.model import InfLlavaModel
from infllava_jax.splice import IMAGE_TOKEN_INDEX


def _dummy_inputs(config: InfLlavaConfig):
    H, W = config.image_size
    ids = jnp.array([[IMAGE_TOKEN_INDEX, 1]], jnp.int32)
    return ids, jnp.zeros((1, H, W, 3), jnp.float32)


@functools.lru_cache(maxsize=8)
def boxed_abstract_params(config: InfLlavaConfig):
    """Parameter shapes boxed with their logical axis names (nn.LogicallyPartitioned)."""
    return jax.eval_shape(lambda: InfLlavaModel(config).init(jax.random.key(0), *_dummy_inputs(config)))["params"]


def abstract_params(config: InfLlavaConfig):
    """Tree of ShapeDtypeStruct of the parameters, without allocating anything."""
    return nn.unbox(boxed_abstract_params(config))


def param_specs(config: InfLlavaConfig):
    """Tree of logical PartitionSpecs of the parameters (names from sharding.LOGICAL_RULES)."""
    return nn.get_partition_spec(boxed_abstract_params(config))


def rebox(config: InfLlavaConfig, params):
    """Plain params -> boxed with logical names, so that inside `apply` (under
    nn.logical_axis_rules and a mesh) every module constrains its weights to their sharding,
    per layer inside scans: weights are gathered layer by layer and their gradients
    reduce-scattered, never materialised whole."""
    is_box = lambda x: isinstance(x, nn.Partitioned)
    return jax.tree.map(lambda b, x: b.replace_boxed(x), boxed_abstract_params(config), params, is_leaf=is_box)


def param_shardings(config: InfLlavaConfig, mesh=None):
    """NamedShardings from the logical-axis rules table (all on one device when mesh is None)."""
    mesh = sharding_lib.make_mesh({"fsdp": 1}, jax.devices()[:1]) if mesh is None else mesh
    return sharding_lib.logical_to_shardings(param_specs(config), mesh, abstract_params(config))


def abstract_sharded(config: InfLlavaConfig, mesh=None):
    """ShapeDtypeStructs with their shardings: the restore target of the parameters."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract_params(config), param_shardings(config, mesh))


def init_params(config: InfLlavaConfig, seed: int = 0, mesh=None):
    """Random parameters, created directly in their sharding."""
    shardings = param_shardings(config, mesh)
    init = lambda key: nn.unbox(InfLlavaModel(config).init(key, *_dummy_inputs(config)))["params"]
    return jax.jit(init, out_shardings=shardings)(jax.random.key(seed))


def init_adapters(config: InfLlavaConfig, seed: int = 0, mesh=None):
    """The LoRA adapters of `config` alone (the `lora_A` / `lora_B` leaves `init_params` would
    draw; XLA drops the rest of the initialisation), created in their sharding."""
    shardings = lora.split(param_shardings(config, mesh), lora.is_adapter)[0]
    init = lambda key: lora.split(nn.unbox(InfLlavaModel(config).init(key, *_dummy_inputs(config)))["params"],
                                  lora.is_adapter)[0]
    return jax.jit(init, out_shardings=shardings)(jax.random.key(seed))


def load_parts(params: dict, parts: dict[str, str], config: InfLlavaConfig, mesh=None) -> dict:
    """`params` with each top-level part `name` replaced by that part of the checkpoint
    `parts[name]` (e.g. {"vision_tower": DIR}), restored onto its shardings in `config`."""
    target = abstract_sharded(config, mesh)
    return {**params, **{name: load_part(path, name, target[name]) for name, path in parts.items()}}


def quantize(config: InfLlavaConfig, params, spec: str, mesh=None):
    """(config with `llm.quant=spec`, its parameters) from an unquantized model's: the target
    projections' kernels quantized with qwix (quant.py), onto the quantized config's shardings."""
    if config.llm.quant is not None:
        raise ValueError(f"the model is quantized already (quant={config.llm.quant!r})")
    qconfig = config.replace(llm=config.llm.replace(quant=spec))
    like = abstract_params(qconfig)
    return qconfig, jax.jit(lambda p: quant.quantize_tree(p, like),
                            out_shardings=param_shardings(qconfig, mesh))(params)
