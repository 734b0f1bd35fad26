"""State dict (name -> array) -> our parameter tree, per source format."""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from infllava_jax import llama, vision
from infllava_jax.config import InfLlavaConfig
from infllava_jax.dem import dem_params_from_torch

RELEASED_VISION_PREFIX = "model.vision_tower.vision_tower.vision_model."


def _projector(sd: Mapping[str, Any], names: tuple[str, str], dtype) -> dict:
    out = {}
    for ours, theirs in zip(("linear_1", "linear_2"), names):
        for leaf, suffix, tr in (("kernel", "weight", True), ("bias", "bias", False)):
            key = f"{theirs}.{suffix}"
            if key not in sd:
                raise KeyError(f"missing key {key!r}")
            a = np.asarray(sd[key])
            out.setdefault(ours, {})[leaf] = (a.T if tr else a).astype(dtype)
    return out


def released_to_params(sd: Mapping[str, Any], config: InfLlavaConfig) -> dict:
    """Released INF-LLaVA state dict (SPEC section 8) -> params (numpy)."""
    params = {"vision_tower": vision.params_from_hf(sd, config.vision, RELEASED_VISION_PREFIX),
              "mm_projector": _projector(sd, ("model.mm_projector.0", "model.mm_projector.2"),
                                         np.dtype(config.llm.param_dtype)),
              "language_model": llama.params_from_hf(sd, config.llm)}
    if config.dem is not None:
        params["spatial_embed"] = dem_params_from_torch(sd, config.dem, prefix="model.spatial_embed.")
    return params


def llava_hf_to_params(sd: Mapping[str, Any], config: InfLlavaConfig) -> dict:
    """transformers LlavaForConditionalGeneration state dict (old or v5 layout) -> params."""
    lm = "language_model." if "language_model.lm_head.weight" in sd else "model.language_model."
    if lm == "model.language_model.":   # v5: model.language_model.layers..., lm_head.weight
        sub = {("model." + k[len(lm):]): v for k, v in sd.items() if k.startswith(lm)}
        sub["lm_head.weight"] = sd["lm_head.weight"]
        proj = "model.multi_modal_projector."
    else:
        sub = {k[len(lm):]: v for k, v in sd.items() if k.startswith(lm)}
        proj = "multi_modal_projector."
    return {"vision_tower": vision.params_from_hf(sd, config.vision, None),
            "mm_projector": _projector(sd, (proj + "linear_1", proj + "linear_2"),
                                       np.dtype(config.llm.param_dtype)),
            "language_model": llama.params_from_hf(sub, config.llm)}
