"""Remat policies (layers.REMAT_POLICIES): every policy gives the gradients of no remat, and each
named one recomputes what it says (matmuls counted in the gradient's program)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from infllava_jax import presets
from infllava_jax.layers import REMAT_POLICIES
from infllava_jax.llama import LlamaForCausalLM, init_params

# "offload_dots" moves residuals to pinned host memory: XLA:CPU has no such memory space
POLICIES = [p for p in REMAT_POLICIES if p != "offload_dots"]


def _loss(cfg, ids):
    w = jax.random.normal(jax.random.key(1), (*ids.shape, cfg.vocab_size))
    return lambda p: jnp.sum(LlamaForCausalLM(cfg).apply({"params": p}, ids)[0] * w)


def _dots(jaxpr) -> int:
    """dot_general equations in a jaxpr and its sub-jaxprs (scan bodies, remat, custom calls)."""
    n = 0
    for e in jaxpr.eqns:
        n += e.primitive.name == "dot_general"
        for v in e.params.values():
            for sub in v if isinstance(v, (list, tuple)) else [v]:
                inner = getattr(sub, "jaxpr", sub)
                n += _dots(inner) if hasattr(inner, "eqns") else 0
    return n


@pytest.fixture(scope="module")
def setup():
    cfg = presets.tiny().llm
    ids = jnp.arange(16, dtype=jnp.int32).reshape(2, 8) % cfg.vocab_size
    return cfg, init_params(cfg), ids


@pytest.mark.parametrize("loop", ["scan", pytest.param("unroll", marks=pytest.mark.slow)])
@pytest.mark.slow
def test_gradients_equal_across_policies(setup, loop):
    cfg, params, ids = setup
    ref_loss, ref = jax.jit(jax.value_and_grad(_loss(cfg.replace(layer_loop=loop), ids)))(params)
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(ref)) > 0
    for policy in POLICIES:
        c = cfg.replace(layer_loop=loop, remat_policy=policy)
        loss, grads = jax.jit(jax.value_and_grad(_loss(c, ids)))(params)
        np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-6, err_msg=policy)
        for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-5 * np.abs(b).max(),
                                       err_msg=policy)


def test_named_policies_recompute_what_they_do_not_save(setup):
    """Matmuls in the gradient of one scanned layer stack: "none" recomputes nothing, "full" the
    whole layer; "minimal" (every projection saved) only the attention's two products; saving the
    attention projections recomputes the MLP's, saving the MLP's recomputes the attention's."""
    cfg, params, ids = setup
    dots = {p: _dots(jax.make_jaxpr(jax.grad(_loss(cfg.replace(layer_loop="scan", remat_policy=p), ids)))(params).jaxpr)
            for p in POLICIES}
    assert dots["none"] < dots["minimal"] < dots["save_attention"] < dots["save_mlp"] < dots["full"], dots
    assert dots["save_attention"] < dots["save_qkv_proj"] < dots["full"], dots
    assert dots["dots"] == dots["none"], dots     # every product saved


def test_unknown_policy_names_the_accepted_ones(setup):
    cfg, params, ids = setup
    with pytest.raises(ValueError, match="expected one of .*'minimal'.*'save_mlp'"):
        _loss(cfg.replace(remat_policy="most"), ids)(params)
