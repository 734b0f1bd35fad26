"""The one attention switch: every attention in the model (ViT, DEM, Llama) goes through here.

impl = "xla"      plain einsum + fp32 softmax (any backend; the CPU path)
       "chunked"  the same per block of 512 queries under remat: the (T, S) score matrix never
                  exists whole, forward or backward (memory-lean on every backend)
       "jax"      jax.nn.dot_product_attention (XLA, or cuDNN flash attention on GPU)
A Pallas/splash kernel for TPU is not wired in yet (see the README).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

IMPLS = ("xla", "chunked", "jax")
QUERY_CHUNK = 512


def dot_product_attention(q, k, v, *, mask=None, scale: float | None = None, impl: str = "xla"):
    """softmax(q k^T * scale + mask) v with grouped-query heads.

    q: (B, T, N, H); k, v: (B, S, K, H) with N % K == 0 (query head n uses kv head n // (N/K)).
    mask: bool, broadcastable to (B, T, S); True = attend. Returns (B, T, N, H) in q.dtype.
    """
    B, T, N, H = q.shape
    K = k.shape[2]
    if N % K:
        raise ValueError(f"{N} query heads are not a multiple of {K} kv heads")
    scale = H ** -0.5 if scale is None else scale
    if impl == "jax":
        m = None if mask is None else jnp.broadcast_to(mask, (B, T, k.shape[1]))[:, None]
        return jax.nn.dot_product_attention(q, k, v, mask=m, scale=scale)
    if impl == "chunked" and T > QUERY_CHUNK:
        return _query_chunked(q, k, v, mask, scale)
    if impl not in IMPLS:
        raise ValueError(f"attention impl={impl!r}; expected one of {IMPLS}")
    qg = q.reshape(B, T, K, N // K, H)
    logits = jnp.einsum("btkgh,bskh->bkgts", qg, k).astype(jnp.float32) * scale
    if mask is not None:
        m = jnp.broadcast_to(mask, (B, T, k.shape[1]))[:, None, None]
        logits = jnp.where(m, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskh->btkgh", probs, v)
    return out.reshape(B, T, N, H)


def _query_chunked(q, k, v, mask, scale):
    """Blocks of QUERY_CHUNK queries in a rematerialised lax.map (exact, same result as "xla")."""
    B, T, N, H = q.shape
    n = -(-T // QUERY_CHUNK)
    pad = n * QUERY_CHUNK - T
    m = jnp.ones((B, T, k.shape[1]), bool) if mask is None else jnp.broadcast_to(mask, (B, T, k.shape[1]))
    qs = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0))).reshape(B, n, QUERY_CHUNK, N, H).swapaxes(0, 1)
    ms = jnp.pad(m, ((0, 0), (0, pad), (0, 0))).reshape(B, n, QUERY_CHUNK, -1).swapaxes(0, 1)
    block = jax.checkpoint(lambda qc, mc: dot_product_attention(qc, k, v, mask=mc, scale=scale, impl="xla"))
    out = jax.lax.map(lambda a: block(*a), (qs, ms))
    return out.swapaxes(0, 1).reshape(B, n * QUERY_CHUNK, N, H)[:, :T]
