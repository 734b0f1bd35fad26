"""`InfLlava`: the public entry point (numpy in, numpy out), and the parameters of a config:
their shapes, logical axes and shardings, created from shapes (nothing allocated twice).

Checkpoints (`save_pretrained` / `from_pretrained`) are checkpoint.py's format; `from_pretrained`
restores each array straight onto its target sharding.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from infllava_jax import lora, sharding as sharding_lib
from infllava_jax.checkpoint import PARAMS_DIR, load_config, load_part, restore_params, save_checkpoint
from infllava_jax.config import InfLlavaConfig
from infllava_jax.errors import InputError
from infllava_jax.generate import LLAMA3_STOP_IDS, generate
from infllava_jax.model import InfLlavaModel
from infllava_jax.splice import IMAGE_TOKEN_INDEX
from infllava_jax.token_ids import prepare_ids


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


@functools.partial(jax.jit, static_argnums=0)
def _forward(config, params, input_ids, pixel_values, attention_mask):
    return InfLlavaModel(config).apply({"params": params}, input_ids, pixel_values, attention_mask)


def _to_channels_last(pixel_values) -> jax.Array:
    """(B, 3, H, W) or (B, K, 3, H, W) numpy, as PyTorch code passes it -> channels-last."""
    x = np.asarray(pixel_values, np.float32)
    if x.ndim not in (4, 5) or x.shape[-3] != 3:
        raise InputError(f"pixel_values has shape {x.shape}; expected (B, 3, H, W) or (B, K, 3, H, W)")
    return jnp.asarray(np.moveaxis(x, -3, -1))


def _model_inputs(config: InfLlavaConfig, input_ids, pixel_values, attention_mask):
    """Checked (ids with one -200 per image, channels-last pixels, mask or None): token_ids.py."""
    pixels = _to_channels_last(pixel_values)
    images = 1 if pixels.ndim == 4 else pixels.shape[1]
    ids, mask = prepare_ids(input_ids, attention_mask, config, images)
    if ids.shape[0] != pixels.shape[0]:
        raise InputError(f"input_ids has {ids.shape[0]} rows, pixel_values {pixels.shape[0]}")
    return jnp.asarray(ids), pixels, None if mask is None else jnp.asarray(mask, jnp.int32)


class InfLlava:
    """An INF-LLaVA (or LLaVA-1.5) model: a config and a parameter tree.

        model = InfLlava.from_pretrained(ckpt_dir)
        logits = model(input_ids, pixel_values)     # numpy in, numpy out

    input_ids (B, L) int with one -200 per image (a model converted from transformers also takes
    its HF image token id, once per image or repeated tokens_per_image times: token_ids.py; any
    other id outside [0, vocab) is an InputError naming the row and position); pixel_values
    (B, 3, H, W) CLIP-normalised float32, H = W = n*s (used directly) or s (bicubic-upsampled
    first, the released inference path). Returns float32 logits (B, L - 1 + tokens_per_image, V)
    (L counted with one id per image).
    """

    def __init__(self, config: InfLlavaConfig, params: Any):
        self.config, self.params = config, params

    @classmethod
    def init(cls, config: InfLlavaConfig, seed: int = 0, mesh=None) -> "InfLlava":
        return cls(config, init_params(config, seed, mesh))

    def __call__(self, input_ids, pixel_values, attention_mask=None) -> np.ndarray:
        ids, pixels, mask = _model_inputs(self.config, input_ids, pixel_values, attention_mask)
        return np.asarray(_forward(self.config, self.params, ids, pixels, mask))

    def generate(self, input_ids, pixel_values, attention_mask=None, *, max_new_tokens: int = 64,
                 stop_ids: Sequence[int] = LLAMA3_STOP_IDS) -> list[np.ndarray]:
        """Greedy decoding; prompts left-padded. Returns one array of new tokens per row
        (stop token included)."""
        ids, pixels, mask = _model_inputs(self.config, input_ids, pixel_values, attention_mask)
        mask = jnp.ones_like(ids) if mask is None else mask
        tokens, lengths = generate(self.config, self.params, ids, pixels, mask,
                                   jnp.asarray(stop_ids, jnp.int32), max_new_tokens=max_new_tokens,
                                   pad_id=self.config.pad_token_id or 0)
        tokens, lengths = np.asarray(tokens), np.asarray(lengths)
        return [t[:n] for t, n in zip(tokens, lengths)]

    # -- checkpoint format ----------------------------------------------------------------------
    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Write `config.json` + `params/` atomically (checkpoint.save_checkpoint)."""
        save_checkpoint(path, self.config, self.params)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, mesh=None) -> "InfLlava":
        config = load_config(path)
        return cls(config, restore_params(Path(path) / PARAMS_DIR, abstract_sharded(config, mesh)))


def load_parts(params: dict, parts: dict[str, str], config: InfLlavaConfig, mesh=None) -> dict:
    """`params` with each top-level part `name` replaced by that part of the checkpoint
    `parts[name]` (e.g. {"vision_tower": DIR}), restored onto its shardings in `config`."""
    target = abstract_sharded(config, mesh)
    return {**params, **{name: load_part(path, name, target[name]) for name, path in parts.items()}}
