"""The one attention switch: every attention in the model (ViT, DEM, Llama) goes through here.

impl = "xla"     plain einsum + fp32 softmax (any backend; the CPU path)
       "jax"     jax.nn.dot_product_attention (XLA, or cuDNN flash attention on GPU)
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

IMPLS = ("xla", "jax")


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
    if impl != "xla":
        raise ValueError(f"attention impl={impl!r}; expected one of {IMPLS}")
    qg = q.reshape(B, T, K, N // K, H)
    logits = jnp.einsum("btkgh,bskh->bkgts", qg, k).astype(jnp.float32) * scale
    if mask is not None:
        m = jnp.broadcast_to(mask, (B, T, k.shape[1]))[:, None, None]
        logits = jnp.where(m, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskh->btkgh", probs, v)
    return out.reshape(B, T, N, H)
