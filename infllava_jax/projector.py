"""Projector `mlp2x_gelu` (docs/model.md section 1): Linear(D_vit -> D_llm), exact GELU, Linear(D_llm -> D_llm).

Submodule names `linear_1` / `linear_2` are HF LLaVA's (`multi_modal_projector.linear_{1,2}`);
the released keys are `model.mm_projector.0` / `.2` (nn.Sequential(Linear, GELU, Linear)).
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from infllava_jax import keymap
from infllava_jax.layers import dense


class Projector(nn.Module):
    out_features: int
    dtype: str = "float32"
    param_dtype: str = "float32"

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=jnp.dtype(self.dtype), param_dtype=jnp.dtype(self.param_dtype))
        x = dense(self.out_features, ("embed", "mlp"), name="linear_1", **kw)(x)
        x = jax.nn.gelu(x, approximate=False)
        return dense(self.out_features, ("mlp", "embed"), name="linear_2", **kw)(x)


RELEASED_NAMES = ("0", "2")            # model.mm_projector.{0,2}
HF_NAMES = ("linear_1", "linear_2")    # multi_modal_projector.linear_{1,2}


def key_map(names: tuple[str, str] = HF_NAMES) -> list[keymap.Row]:
    """Table (keymap.Row) between our projector params and torch keys named `names`."""
    return keymap.rows(keymap.linear("linear_1", names[0]) + keymap.linear("linear_2", names[1]))
