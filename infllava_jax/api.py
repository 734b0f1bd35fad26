"""`InfLlava`: the public entry point (numpy in, numpy out). The parameter helpers it builds on
(shapes, shardings, initialisation) are params.py's.

Checkpoints (`save_pretrained` / `from_pretrained`) are checkpoint.py's format plus usage.json
and the tokenizer files (conversation.py: template, stop ids, pixel and image mode, doubled BOS);
`from_pretrained` restores each array straight onto its target sharding and loads the tokenizer
on first use. docs/using.md shows the calls.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from infllava_jax import conversation, inputs, quant as quant_lib
from infllava_jax.checkpoint import PARAMS_DIR, load_config, restore_params, save_checkpoint
from infllava_jax.config import InfLlavaConfig
from infllava_jax.errors import InputError
from infllava_jax.generate import generate
from infllava_jax.model import InfLlavaModel
from infllava_jax.params import abstract_sharded, init_params, quantize
from infllava_jax.token_ids import prepare_ids


@functools.partial(jax.jit, static_argnums=0)
def _forward(config, params, input_ids, pixel_values, attention_mask):
    return InfLlavaModel(config).apply({"params": params}, input_ids, pixel_values, attention_mask)


def _checked_quant(spec: str, config: InfLlavaConfig) -> str:
    try:
        quant_lib.parse(spec)
    except ValueError as e:
        raise InputError(str(e)) from None
    if config.llm.quant is not None:
        raise InputError(f"quant={spec!r}: the checkpoint is quantized as {config.llm.quant!r} already")
    return spec


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
    """An INF-LLaVA (or LLaVA-1.5) model: a config, a parameter tree and how it is used.

        model = InfLlava.from_pretrained(ckpt_dir)
        model.chat("photo.jpg", "What is in the image?")          # -> str
        batch = model.prepare(["a.jpg", "b.jpg"], "Describe the image.")
        logits = model(**batch)                                   # numpy in, numpy out
        tokens = model.generate(**batch, max_new_tokens=32)       # one array per row

    input_ids (B, L) int with one -200 per image (a model converted from transformers also takes
    its HF image token id, once per image or repeated tokens_per_image times: token_ids.py; any
    other id outside [0, vocab) is an InputError naming the row and position); pixel_values
    (B, 3, H, W) CLIP-normalised float32, H = W = n*s (used directly) or s (bicubic-upsampled
    first, the released inference path). Returns float32 logits (B, L - 1 + tokens_per_image, V)
    (L counted with one id per image).

    `usage` (conversation.Usage; from_pretrained reads the checkpoint's usage.json) decides the
    template, stop ids and preprocessing; `tokenizer` is a tokenizer object, "tiny", a tokenizer
    directory, or None (the checkpoint's own, as recorded).
    """

    def __init__(self, config: InfLlavaConfig, params: Any, *, usage: conversation.Usage | None = None,
                 tokenizer=None, path: str | os.PathLike | None = None):
        self.config, self.params = config, params
        self.usage = usage or conversation.Usage()
        self.path = None if path is None else Path(path)
        self._tokenizer = None if tokenizer is None or isinstance(tokenizer, (str, os.PathLike)) else tokenizer
        self._tokenizer_spec = str(tokenizer) if isinstance(tokenizer, (str, os.PathLike)) else ""

    @classmethod
    def init(cls, config: InfLlavaConfig, seed: int = 0, mesh=None, **kw) -> "InfLlava":
        return cls(config, init_params(config, seed, mesh), **kw)

    @property
    def tokenizer(self):
        """Loaded on first use: the checkpoint's tokenizer files, or as `tokenizer=` said."""
        if self._tokenizer is None:
            self._tokenizer = conversation.tokenizer_for(self.path, self.usage, self.config.llm.vocab_size,
                                                         self._tokenizer_spec)
        return self._tokenizer

    @property
    def stop_ids(self) -> tuple[int, ...]:
        return conversation.stop_ids(self.usage, None if self.usage.stop_ids else self.tokenizer)

    def prepare(self, images, prompts, *, padding_side: str = "left") -> dict[str, np.ndarray]:
        """Images (paths, PIL images or arrays; one per prompt, or a list per prompt) and prompts
        (str or list) -> {input_ids, attention_mask, pixel_values} for __call__ / generate:
        the checkpoint's template, pixel mode and resolution; rows padded (inputs.py)."""
        pad = self.config.pad_token_id if self.config.pad_token_id is not None else self.tokenizer.pad_token_id
        return inputs.prepare(self.config, self.usage, self.tokenizer, images, prompts, pad_id=pad or 0,
                              padding_side=padding_side)

    def __call__(self, input_ids, pixel_values, attention_mask=None) -> np.ndarray:
        ids, pixels, mask = _model_inputs(self.config, input_ids, pixel_values, attention_mask)
        return np.asarray(_forward(self.config, self.params, ids, pixels, mask))

    def generate(self, input_ids, pixel_values, attention_mask=None, *, max_new_tokens: int = 64,
                 stop_ids: Sequence[int] | None = None) -> list[np.ndarray]:
        """Greedy decoding; prompts left-padded. Returns one array of new tokens per row
        (stop token included). stop_ids: None = the checkpoint's (self.stop_ids)."""
        ids, pixels, mask = _model_inputs(self.config, input_ids, pixel_values, attention_mask)
        mask = jnp.ones_like(ids) if mask is None else mask
        stops = self.stop_ids if stop_ids is None else tuple(stop_ids)
        tokens, lengths = generate(self.config, self.params, ids, pixels, mask,
                                   jnp.asarray(stops or (-1,), jnp.int32), max_new_tokens=max_new_tokens,
                                   pad_id=self.config.pad_token_id or 0)
        tokens, lengths = np.asarray(tokens), np.asarray(lengths)
        return [t[:n] for t, n in zip(tokens, lengths)]

    def decode(self, tokens) -> str:
        """Generated ids -> text (special tokens skipped, stripped)."""
        return conversation.decode(self.tokenizer, tokens)

    def chat(self, image, question: str, *, max_new_tokens: int = 256) -> str:
        """One image (path, PIL image or array) and a question -> the answer (greedy)."""
        return self.decode(self.generate(**self.prepare(image, question), max_new_tokens=max_new_tokens)[0])

    # -- checkpoint format ----------------------------------------------------------------------
    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Write `config.json` + `params/` + usage.json (+ the tokenizer files) atomically."""
        save_checkpoint(path, self.config, quant_lib.to_saved(self.params), extra_files=self._write_usage)

    def _write_usage(self, directory: Path) -> None:
        usage, files = self.usage, None
        if self._tokenizer_spec == "tiny":
            usage = usage.override(tokenizer="tiny")
        elif self._tokenizer_spec:
            files = self._tokenizer_spec
        elif usage.tokenizer == "tiny":
            pass
        elif self.path is not None and usage.tokenizer == "files" and conversation.has_tokenizer(self.path):
            files = self.path
        elif self._tokenizer is not None:
            self._tokenizer.save_pretrained(directory)
            usage = usage.override(tokenizer="files")
        if files is None and self._tokenizer is None and usage.tokenizer == "files":
            usage = dataclasses.replace(usage, tokenizer="")   # none to carry: say so
        conversation.write_usage(directory, usage, files)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, mesh=None, tokenizer=None,
                        usage: conversation.Usage | None = None, quant: str | None = None) -> "InfLlava":
        """Config, parameters (onto `mesh`'s shardings) and usage.json of a checkpoint; the
        tokenizer is read on first use. tokenizer: None = the checkpoint's; "tiny"; a directory;
        or a tokenizer object. usage: replaces the recorded one. quant: "int8" | "int4" quantizes
        the language model's projections (quant.py); a quantized checkpoint loads as saved."""
        config = load_config(path)
        usage = usage or conversation.read_usage(path)
        target = abstract_sharded(config, mesh)
        params = quant_lib.from_saved(restore_params(Path(path) / PARAMS_DIR, quant_lib.to_saved(target)), target)
        if quant is not None and quant != config.llm.quant:
            config, params = quantize(config, params, _checked_quant(quant, config), mesh)
        return cls(config, params, usage=usage, tokenizer=tokenizer, path=path)
