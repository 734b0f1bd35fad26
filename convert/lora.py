"""LoRA checkpoints in the files LLaVA-family users download and PEFT reads, both ways.

A LLaVA LoRA directory (liuhaotian/llava-v1.5-7b-lora's layout):

    adapter_config.json          PEFT: r, lora_alpha, target_modules, ...
    adapter_model.safetensors    base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight [r, in],
                                 ....lora_B.weight [out, r]   (or adapter_model.bin)
    non_lora_trainables.bin      what trained in full: base_model.model.model.mm_projector.*,
                                 base_model.model.model.spatial_embed.* (INF-LLaVA's DEM)
    config.json                  the LlavaLlamaForCausalLM config (our exports add the DEM/CLIP fields)

The key names are PEFT's around the released (LlavaLlamaForCausalLM) keys: "base_model.model." +
`model.layers.{i}.self_attn.q_proj` + ".lora_A.weight". Import (`read`) merges every adapter into
its base tensor lazily, W + (lora_alpha / r) B A in PyTorch's [out, in] layout, one region at a
time; export (lora_export.save_adapters) writes the adapters of a LoRA training run.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Mapping

import numpy as np

from convert.errors import ConversionError, MissingKeysError, ShapeMismatchError, UnexpectedKeysError, listing
from convert.sources import Tensor, open_file, ranges

PEFT_PREFIX = "base_model.model."
ADAPTER_CONFIG, NON_LORA = "adapter_config.json", "non_lora_trainables.bin"
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")
ADAPTER_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])\.weight$")


class LoraMerged(Tensor):
    """base + scaling * B @ A (PyTorch layout: base [out, in], A [r, in], B [out, r]), computed in
    float32 for the region read and rounded to the base's dtype."""

    def __init__(self, base: Tensor, a: Tensor, b: Tensor, scaling: float):
        self.base, self.a, self.b, self.scaling = base, a, b, float(scaling)
        self.shape, self.dtype, self.where = base.shape, base.dtype, f"{base.where} + LoRA ({a.where})"

    def read(self, index=None) -> np.ndarray:
        (r0, r1), (c0, c1) = ranges(index, self.shape)
        rows, cols = slice(r0, r1), slice(c0, c1)
        w = self.base.read((rows, cols)).astype(np.float32)
        delta = self.b.read((rows,)).astype(np.float32) @ self.a.read((slice(None), cols)).astype(np.float32)
        return (w + np.float32(self.scaling) * delta).astype(self.dtype)


def is_lora_dir(path: Path) -> bool:
    return path.is_dir() and (path / ADAPTER_CONFIG).is_file()


def read_adapter_config(directory: Path) -> dict:
    """adapter_config.json, checked: plain LoRA (no rsLoRA, DoRA, per-module ranks, fan_in_fan_out)."""
    f = directory / ADAPTER_CONFIG
    try:
        d = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConversionError(f"{f}: not valid JSON ({e})") from None
    if not isinstance(d, dict) or d.get("peft_type", "LORA") != "LORA":
        raise ConversionError(f"{f}: not a PEFT LoRA config (peft_type {d.get('peft_type') if isinstance(d, dict) else d!r})")
    r, alpha = d.get("r"), d.get("lora_alpha")
    if isinstance(r, bool) or not isinstance(r, int) or r < 1 or not isinstance(alpha, (int, float)):
        raise ConversionError(f"{f}: r={r!r} and lora_alpha={alpha!r}; expected a positive integer and a number")
    for field in ("use_rslora", "use_dora", "fan_in_fan_out", "rank_pattern", "alpha_pattern"):
        if d.get(field):
            raise ConversionError(f"{f}: {field}={d[field]!r} is not supported (plain LoRA only)")
    return d


def read(directory: Path, base: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor], str]:
    """(base with every adapted tensor merged, the non-LoRA trainables under their released
    names, a note). Every adapter key must name a base tensor, come with its partner, and have
    PEFT's shapes lora_A [r, in], lora_B [out, r]; otherwise an error names the key and shapes."""
    directory = Path(directory)
    cfg = read_adapter_config(directory)
    r, scaling = cfg["r"], cfg["lora_alpha"] / cfg["r"]
    found = [directory / n for n in ADAPTER_FILES if (directory / n).is_file()]
    if not found or not (directory / NON_LORA).is_file():
        raise ConversionError(f"{directory}: a LoRA checkpoint needs {' or '.join(ADAPTER_FILES)} and {NON_LORA}")
    adapters = open_file(found[0])
    pairs: dict[str, dict[str, Tensor]] = {}
    for key, t in adapters.items():
        m = ADAPTER_KEY.match(key)
        if m is None:
            raise UnexpectedKeysError(f"{found[0]}: key {key!r} is not a LoRA weight "
                                      f"('{PEFT_PREFIX}<module>.lora_A.weight' / '.lora_B.weight')")
        pairs.setdefault(m["module"], {})[m["ab"]] = t
    merged = dict(base)
    for module, ab in sorted(pairs.items()):
        merged[module + ".weight"] = _merged(module, ab, base, r, scaling, found[0])
    trainables = {(k[len(PEFT_PREFIX):] if k.startswith(PEFT_PREFIX) else k): t
                  for k, t in open_file(directory / NON_LORA).items()}
    note = (f"LoRA from {found[0].name}: {len(pairs)} projections merged, W + {cfg['lora_alpha']}/{r} B A; "
            f"DEM and projector from {NON_LORA}")
    return merged, trainables, note


def _merged(module: str, ab: dict[str, Tensor], base: Mapping[str, Tensor], r: int, scaling: float,
            where: Path) -> LoraMerged:
    key = PEFT_PREFIX + module
    missing = [f"{key}.lora_{x}.weight" for x in "AB" if x not in ab]
    if missing:
        raise MissingKeysError(f"{where}: missing {listing(missing)} (its partner is there)")
    w = base.get(module + ".weight")
    if w is None:
        raise MissingKeysError(f"{where}: {key}.lora_A.weight adapts {module}.weight, which the base model does not have")
    if len(w.shape) != 2:
        raise ShapeMismatchError(f"{where}: {module}.weight has shape {tuple(w.shape)}; LoRA adapts a matrix")
    want = {"A": (r, w.shape[1]), "B": (w.shape[0], r)}
    for x in "AB":
        if tuple(ab[x].shape) != want[x]:
            raise ShapeMismatchError(f"{where}: {key}.lora_{x}.weight has shape {tuple(ab[x].shape)}, expected "
                                     f"{want[x]} (base {module}.weight {tuple(w.shape)}, r={r})")
    return LoraMerged(w, ab["A"], ab["B"], scaling)
