"""Every attention path that runs here agrees with the plain XLA one, forward and backward."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from infllava_jax.attention import QUERY_CHUNK, dot_product_attention


@pytest.mark.parametrize("impl", ["chunked", "jax"])
def test_impls_agree_with_xla(impl):
    rng = np.random.default_rng(0)
    T = QUERY_CHUNK * 2 + 37                      # not a multiple of the block size
    q = jnp.asarray(rng.normal(size=(2, T, 4, 16)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(2, T, 2, 16)), jnp.float32)   # grouped-query heads
    v = jnp.asarray(rng.normal(size=(2, T, 2, 16)), jnp.float32)
    pad = jnp.arange(T)[None, :] >= jnp.array([[0], [100]])         # row 2 left-padded
    mask = jnp.tril(jnp.ones((T, T), bool))[None] & pad[:, None, :]

    def f(impl, q, k, v):
        out = dot_product_attention(q, k, v, mask=mask, impl=impl)
        return jnp.sum(jnp.where(pad[..., None, None], out, 0.0) ** 2), out

    (l0, o0), g0 = jax.value_and_grad(lambda *a: f("xla", *a), argnums=(0, 1, 2), has_aux=True)(q, k, v)
    (l1, o1), g1 = jax.value_and_grad(lambda *a: f(impl, *a), argnums=(0, 1, 2), has_aux=True)(q, k, v)
    valid = np.asarray(pad)
    np.testing.assert_allclose(np.asarray(o1)[valid], np.asarray(o0)[valid], atol=2e-5, rtol=1e-5)
    for a, b in zip(g1, g0):
        np.testing.assert_allclose(a, b, atol=2e-5 * float(jnp.abs(b).max()))


def test_unknown_impl_is_refused():
    x = jnp.zeros((1, 2, 1, 4))
    with pytest.raises(ValueError, match="attention impl"):
        dot_product_attention(x, x, x, impl="flash3")
