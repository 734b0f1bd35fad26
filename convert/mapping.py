"""In-memory state dict (name -> numpy / torch array) -> our parameter tree (numpy), per format.

Thin functions over the tables of convert/formats.py and the engine of convert/engine.py;
files are handled by `python -m convert` (streaming).
"""
from __future__ import annotations

from typing import Any, Mapping

from convert import engine, formats
from convert.sources import ArrayTensor
from infllava_jax.params import abstract_params
from infllava_jax.config import InfLlavaConfig


def _tensors(sd: Mapping[str, Any]):
    return {k: ArrayTensor(v) for k, v in sd.items()}


def released_to_params(sd: Mapping[str, Any], config: InfLlavaConfig) -> dict:
    """Released INF-LLaVA state dict (docs/model.md section 8, vision tower included) -> params (numpy)."""
    plan = engine.import_plan(formats.released_rows(config), _tensors(sd), abstract_params(config),
                              ignore=formats.released_ignore(config), what="released state dict")
    return engine.to_numpy(plan)


def llava_hf_to_params(sd: Mapping[str, Any], config: InfLlavaConfig) -> dict:
    """transformers LlavaForConditionalGeneration state dict (4.x files, v5 files or v5
    modules' state_dict()) -> params (numpy)."""
    layout = formats.LlavaLayout.detect(sd)
    plan = engine.import_plan(formats.llava_hf_rows(config, layout), _tensors(sd), abstract_params(config),
                              ignore=formats.llava_hf_ignore(config, layout), what="LLaVA state dict")
    return engine.to_numpy(plan)
