"""cuDNN flash attention (GPU): `jax.nn.dot_product_attention(implementation="cudnn")` with
`is_causal` and sequence lengths, never a dense mask.

cuDNN's padding mask is a prefix of `length` real tokens, so rows are first rotated left by their
number of leading padding keys (left padding becomes right padding; a uniform shift keeps causal
order, RoPE is already applied) and the output is rotated back. This is exact for padding at
either end of a row, which is what this codebase makes (`pad_batch` pads right, generation pads
left); a row whose real tokens are not one contiguous run is outside the contract.
Supported: bfloat16 / float16, head size a multiple of 8 up to 256 (128 before Hopper).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

DTYPES = (jnp.bfloat16, jnp.float16)


def max_head_dim() -> int:
    cc = getattr(jax.devices()[0], "compute_capability", None)   # "9.0" on H100, None off GPU
    return 128 if cc is not None and float(cc) < 9.0 else 256


def unsupported(q) -> str:
    """Why cuDNN flash attention cannot take queries like `q`, or "" when it can."""
    H = q.shape[-1]
    if q.dtype not in DTYPES:
        return f"cuDNN flash attention takes bfloat16 or float16, not {q.dtype}"
    if H % 8 or H > max_head_dim():
        return f"cuDNN flash attention needs a head size that is a multiple of 8 up to {max_head_dim()}, not {H}"
    return ""


def attend(q, k, v, *, causal: bool, kv_mask=None, scale: float, implementation: str = "cudnn"):
    """q: (B, T, N, H), k, v: (B, S, K, H); kv_mask (B, S) bool or None. `implementation="xla"`
    runs the same call through JAX's XLA path (how the tests check it on CPU)."""
    why = unsupported(q)
    if why and implementation == "cudnn":
        raise ValueError(f"attention impl='cudnn': {why}")
    kw = dict(scale=scale, is_causal=causal, implementation=implementation)
    if kv_mask is None:
        return jax.nn.dot_product_attention(q, k, v, **kw)
    kv_mask = kv_mask.astype(bool)
    first = jnp.argmax(kv_mask, axis=1).astype(jnp.int32)          # leading padding keys per row
    lengths = jnp.sum(kv_mask, axis=1, dtype=jnp.int32)
    k, v = _rotate(k, first), _rotate(v, first)
    if not causal:                                                 # queries keep their places
        return jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=lengths, **kw)
    out = jax.nn.dot_product_attention(_rotate(q, first), k, v, query_seq_lengths=lengths,
                                       key_value_seq_lengths=lengths, **kw)
    return _rotate(out, -first)


def _rotate(x, shift):
    """x[b, (t + shift[b]) mod T] for x (B, T, ...)."""
    T = x.shape[1]
    idx = (jnp.arange(T, dtype=jnp.int32)[None, :] + shift[:, None]) % T
    return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)
