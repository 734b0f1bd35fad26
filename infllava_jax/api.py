"""`InfLlava`: the public entry point (numpy in, numpy out). The parameter helpers it builds on
(shapes, shardings, initialisation) are params.py's.

Checkpoints (`save_pretrained` / `from_pretrained`) are checkpoint.py's format; `from_pretrained`
restores each array straight onto its target sharding.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from infllava_jax.checkpoint import PARAMS_DIR, load_config, restore_params, save_checkpoint
from infllava_jax.config import InfLlavaConfig
from infllava_jax.errors import InputError
from infllava_jax.generate import LLAMA3_STOP_IDS, generate
from infllava_jax.model import InfLlavaModel
from infllava_jax.params import abstract_sharded, init_params
from infllava_jax.token_ids import prepare_ids


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
