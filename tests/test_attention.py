"""Every attention path agrees with the plain XLA one, forward and backward. cuDNN runs its own
call with `implementation="xla"` (no GPU here); splash runs in Pallas interpret mode."""
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from infllava_jax import attention, attention_cudnn, attention_splash, params as params_lib, sharding
from infllava_jax.attention import QUERY_CHUNK, dot_product_attention
from tests.tiers import slow


def qkv(B, T, S, N, K, H, dtype=jnp.float32, seed=0):
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.normal(size=(B, L, n, H)), dtype) for L, n in ((T, N), (S, K), (S, K)))


def padding(B, T, left=(0, 37), right=(0, 0)):
    """(B, T) bool: row b has left[b] padding tokens first and right[b] last."""
    t = np.arange(T)[None, :]
    return jnp.asarray((t >= np.array(left)[:B, None]) & (t < T - np.array(right)[:B, None]))


def check_against_xla(fn, q, k, v, kv_mask=None, causal=False, rtol=1e-5):
    """fn(q, k, v) against attention "xla" with the same masking: outputs on real rows and the
    gradients of a loss over real rows (padding rows are undefined)."""
    rows = np.ones(q.shape[:2], bool) if kv_mask is None or not causal else np.asarray(kv_mask)

    def loss(f, q, k, v):
        out = f(q, k, v)
        return jnp.sum(jnp.where(rows[..., None, None], out.astype(jnp.float32), 0.0) ** 2), out

    ref = lambda q, k, v: dot_product_attention(q, k, v, causal=causal, kv_mask=kv_mask, impl="xla")
    grads = lambda f: jax.jit(jax.value_and_grad(lambda *a: loss(f, *a), argnums=(0, 1, 2), has_aux=True))
    (_, o0), g0 = grads(ref)(q, k, v)
    (_, o1), g1 = grads(fn)(q, k, v)
    f32 = lambda x: np.asarray(x, np.float32)
    np.testing.assert_allclose(f32(o1)[rows], f32(o0)[rows], rtol=rtol, atol=rtol * float(jnp.abs(f32(o0)).max()))
    for a, b in zip(g1, g0):
        np.testing.assert_allclose(f32(a), f32(b), atol=rtol * float(jnp.abs(f32(b)).max()))


@pytest.mark.parametrize("impl", ["chunked", "jax"])
def test_impls_agree_with_xla(impl):
    T = QUERY_CHUNK * 2 + 37                      # not a multiple of the block size
    q, k, v = qkv(2, T, T, 4, 2, 16)              # grouped-query heads
    pad = padding(2, T, left=(0, 100))
    check_against_xla(lambda *a: dot_product_attention(*a, causal=True, kv_mask=pad, impl=impl), q, k, v,
                      kv_mask=pad, causal=True, rtol=2e-5)


def test_structured_mask_is_the_dense_one():
    """causal + kv_mask gives what the dense mask (the Llama's former input) gave."""
    T = 40
    q, k, v = qkv(2, T, T, 4, 2, 16)
    pad = padding(2, T, left=(0, 9))
    dense = jnp.tril(jnp.ones((T, T), bool))[None] & pad[:, None, :]
    np.testing.assert_array_equal(dot_product_attention(q, k, v, causal=True, kv_mask=pad),
                                  dot_product_attention(q, k, v, mask=dense))


@pytest.mark.parametrize("dtype,rtol,left,right", [
    (jnp.float32, 1e-5, (5, 0), (0, 11)), (jnp.bfloat16, 2e-2, (0, 23), (0, 0)),
    *slow(*((d, r, lt, rt) for d, r in [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)]
            for lt, rt in [((0, 0), (0, 23)), ((0, 23), (0, 0)), ((5, 0), (0, 11))]
            if (d, lt) not in [(jnp.float32, (5, 0)), (jnp.bfloat16, (0, 23))]))])
def test_cudnn_call_with_lengths(dtype, rtol, left, right):
    """The cuDNN call (is_causal, sequence lengths after the rotation), run by XLA: left, right and
    both-ends padding, grouped-query heads."""
    T = 96
    q, k, v = qkv(2, T, T, 8, 2, 32, dtype)
    pad = padding(2, T, left, right)
    fn = lambda *a: attention_cudnn.attend(*a, causal=True, kv_mask=pad, scale=32 ** -0.5, implementation="xla")
    check_against_xla(fn, q, k, v, kv_mask=pad, causal=True, rtol=rtol)


def test_cudnn_call_without_causal_mask():
    """The ViT's and the DEM's shape of call: no mask, queries != keys; and padding keys."""
    q, k, v = qkv(2, 50, 70, 4, 4, 64, jnp.bfloat16)
    fn = lambda *a: attention_cudnn.attend(*a, causal=False, scale=0.125, implementation="xla")
    check_against_xla(fn, q, k, v, rtol=2e-2)
    pad = padding(2, 70, left=(0, 7), right=(3, 0))
    fn = lambda *a: attention_cudnn.attend(*a, causal=False, kv_mask=pad, scale=0.125, implementation="xla")
    check_against_xla(fn, q, k, v, kv_mask=pad, rtol=2e-2)


def test_cudnn_refuses_what_it_cannot_run():
    q, k, v = qkv(1, 8, 8, 2, 2, 16)
    with pytest.raises(ValueError, match="bfloat16 or float16, not float32"):
        dot_product_attention(q, k, v, impl="cudnn")
    q, k, v = qkv(1, 8, 8, 2, 2, 12, jnp.bfloat16)
    with pytest.raises(ValueError, match="multiple of 8 up to 256, not 12"):
        dot_product_attention(q, k, v, impl="cudnn")
    with pytest.raises(ValueError, match="float32 or bfloat16, not float16"):
        dot_product_attention(*qkv(1, 8, 8, 2, 2, 16, jnp.float16), impl="splash")


def test_auto_is_chunked_on_cpu_and_logged_once(caplog):
    attention._LOGGED.clear()
    q, k, v = qkv(1, 8, 8, 2, 2, 16)
    with caplog.at_level(logging.INFO, logger="infllava_jax"):
        for _ in range(3):
            np.testing.assert_array_equal(dot_product_attention(q, k, v, impl="auto"),
                                          dot_product_attention(q, k, v, impl="chunked"))
    assert [r.getMessage() for r in caplog.records] == ["attention auto -> chunked on cpu (no fused kernel on cpu)"]
    assert attention.resolve("splash", q, general_mask=True) == "chunked"     # the KV-cache path


def test_splash_causal_gqa_padding():
    """Causal, grouped-query heads, left/right padding as segment ids, 200 tokens (padded to 256)."""
    T = 200
    q, k, v = qkv(2, T, T, 4, 2, 32)
    pad = padding(2, T, left=(0, 30), right=(17, 0))
    fn = lambda *a: dot_product_attention(*a, causal=True, kv_mask=pad, impl="splash")
    check_against_xla(fn, q, k, v, kv_mask=pad, causal=True)


def test_splash_without_mask():
    """The ViT's and the DEM's calls: no mask; queries != keys, neither a multiple of 128."""
    q, k, v = qkv(2, 77, 130, 4, 4, 64)
    check_against_xla(lambda *a: dot_product_attention(*a, impl="splash"), q, k, v)


def test_splash_under_shard_map_on_a_mesh():
    """Inside jit on a data=2, fsdp=2, tensor=2 mesh: batch over (data, fsdp), heads over tensor."""
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    T = 128
    q, k, v = qkv(4, T, T, 4, 2, 32)
    pad = padding(4, T, left=(0, 9, 0, 50), right=(0, 0, 20, 0))
    assert attention_splash._mesh_axes(4, 4, 2) == (None, None)          # no mesh: no shard_map
    with jax.set_mesh(mesh):
        assert attention_splash._mesh_axes(4, 4, 2) == (("data", "fsdp"), ("tensor",))
        fn = jax.jit(lambda *a: dot_product_attention(*a, causal=True, kv_mask=pad, impl="splash"))
        check_against_xla(fn, q, k, v, kv_mask=pad, causal=True)
        assert "shard_map" in str(jax.make_jaxpr(fn)(q, k, v))


def test_unknown_impl_is_refused():
    x = jnp.zeros((1, 2, 1, 4))
    with pytest.raises(ValueError, match="attention impl"):
        dot_product_attention(x, x, x, impl="flash3")


@pytest.mark.slow
def test_tiny_model_with_splash_everywhere_equals_xla():
    """ViT, DEM and Llama attentions all through splash (interpret mode), a left- and a
    right-padded row: the logits of the real tokens equal the xla model's."""
    from infllava_jax import presets
    from infllava_jax.api import InfLlava
    from infllava_jax.splice import IMAGE_TOKEN_INDEX

    cfg = presets.tiny()
    params = params_lib.init_params(cfg, 0)
    rng = np.random.default_rng(0)
    L = 60
    ids = rng.integers(1, cfg.llm.vocab_size, (2, L)).astype(np.int32)
    mask = np.ones((2, L), np.int32)
    mask[0, L - 9:], mask[1, :7] = 0, 0                            # right-padded row, left-padded row
    ids[0, 3], ids[1, 10] = IMAGE_TOKEN_INDEX, IMAGE_TOKEN_INDEX
    H, W = cfg.image_size
    pixels = rng.normal(size=(2, 3, H, W)).astype(np.float32)
    want = InfLlava(cfg, params)(ids, pixels, mask)
    got = InfLlava(cfg.with_runtime(attention_impl="splash"), params)(ids, pixels, mask)
    T = cfg.tokens_per_image
    real = np.stack([np.repeat(m, np.where(i == IMAGE_TOKEN_INDEX, T, 1)) for i, m in zip(ids, mask)]) == 1
    np.testing.assert_allclose(got[real], want[real], rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_cpu_blocks_of_heads_equal_one_block(monkeypatch):
    """On CPU the B*K heads run in sequential, rematerialised blocks when their scores exceed
    CPU_BLOCK_BYTES (attention._cpu_blocks): the same outputs and gradients as one block, with
    GQA, causal masking and padding."""
    B, T, N, K, H = 3, 40, 4, 2, 16
    q, k, v = qkv(B, T, T, N, K, H)
    pad = padding(B, T, left=(0, 9, 3), right=(0, 0, 0))
    per_head = (N // K) * T * T * 4
    fn = lambda *a: dot_product_attention(*a, causal=True, kv_mask=pad, impl="xla")

    def loss_and_grads():   # a new function each call, so traced anew with the blocks set now
        return jax.jit(jax.value_and_grad(lambda *a: jnp.sum(jnp.where(pad[..., None, None], fn(*a), 0) ** 2),
                                          argnums=(0, 1, 2)))(q, k, v)
    monkeypatch.setattr(attention, "CPU_MIN_HEAD_BYTES", 0)
    monkeypatch.setattr(attention, "CPU_BLOCK_BYTES", 10 ** 12)
    ref = loss_and_grads()
    assert attention._cpu_blocks(B * K, per_head) == 1
    monkeypatch.setattr(attention, "CPU_BLOCK_BYTES", 2 * per_head)     # 3 blocks of 2 heads
    assert attention._cpu_blocks(B * K, per_head) == 3
    got = loss_and_grads()
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6 * float(jnp.abs(b).max()))


def test_cpu_block_count():
    mib = 2 ** 20
    assert attention._cpu_blocks(40, int(1.33 * mib)) == 20       # the ViT's 10 views x 4 heads at 577 tokens
    assert attention._cpu_blocks(4, 16 * mib) == 4                 # a head over the budget runs alone
    assert attention._cpu_blocks(7, mib) == 7                      # no divisor fits: one head per block
    assert attention._cpu_blocks(4, mib) == 1                      # within the budget: one block
    assert attention._cpu_blocks(4000, 8 * 2 ** 10) == 1            # short sequences: one block
