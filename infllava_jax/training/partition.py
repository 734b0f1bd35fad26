"""Train state shapes and shardings from the config alone (nothing allocated).

Parameters follow the logical-axis rules (sharding.py); Adam's moments follow their parameter;
scalars (step, counts) are replicated. Used by train.py to create the state in place and by
plan.py to compile the step from shapes.
"""
from __future__ import annotations

from typing import Sequence

import jax
import optax

from infllava_jax import params as params_lib, quant, sharding
from infllava_jax.config import InfLlavaConfig
from infllava_jax.training import step as step_lib


def state_shardings(config: InfLlavaConfig, parts: Sequence[str], tx: optax.GradientTransformation, mesh):
    """(abstract train state, matching tree of NamedShardings); `parts` train."""
    abstract_params = quant.hold(params_lib.abstract_params(config))    # int4 in int8 on CPU (quant.held)
    p_sh = params_lib.param_shardings(config, mesh)
    abstract_state = jax.eval_shape(lambda p: step_lib.init_state(p, parts, tx, config), abstract_params)
    train_sh, frozen_sh = step_lib.split_params(p_sh, parts)
    rep = sharding.replicated(mesh)
    opt_sh = optax.tree_map_params(tx, lambda _, s: s, abstract_state["opt_state"], train_sh,
                                   transform_non_params=lambda _: rep)
    shardings = {"step": rep, "params": train_sh, "frozen": frozen_sh, "opt_state": opt_sh}
    return abstract_state, shardings


def batch_shardings(abstract_batch: dict, mesh) -> dict:
    """Batches are (accumulation steps, batch, ...): the batch axis over (data, fsdp)."""
    return {k: sharding.batch_sharding(mesh, v.ndim, batch_axis=1) for k, v in abstract_batch.items()}
