"""The one attention switch: every attention in the model (ViT, DEM, Llama) goes through here.

impl = "xla"      plain einsums + fp32 softmax (any backend; the CPU path)
       "chunked"  the same per block of 512 queries under remat: the (T, S) score matrix never
                  exists whole, forward or backward (memory-lean on every backend)
       "jax"      jax.nn.dot_product_attention without `implementation=`: XLA in jax 0.10 (not cuDNN)
       "cudnn"    cuDNN flash attention (GPU; bf16/fp16): attention_cudnn.py
       "splash"   Pallas splash attention (TPU; Pallas interpret mode elsewhere): attention_splash.py
       "auto"     cudnn on GPU, splash on TPU, chunked elsewhere (logged once)

What a call masks: `causal` (query t attends keys s <= t; T == S), `kv_mask` (B, S) False at padding
keys, `segment_ids` (B, T) of packed rows (T == S: query t attends only keys of its own segment;
0 = padding), or a general bool `mask` broadcastable to (B, T, S) (the KV-cache path). The fused
kernels take `causal` and `kv_mask` natively, splash also `segment_ids`; a general mask, segment
ids under cudnn, or a dtype or head size the kernel refuses under "auto", runs as "chunked"
instead (logged once per case).
"""
from __future__ import annotations

import contextlib
import logging

import jax
import jax.numpy as jnp

from infllava_jax import attention_cudnn, attention_splash

IMPLS = ("xla", "chunked", "jax", "cudnn", "splash", "auto")
FUSED = ("cudnn", "splash")
QUERY_CHUNK = 512
CPU_BLOCK_BYTES = 4 * 2 ** 20   # fp32 scores per block of heads on CPU: one core's L2 here
CPU_MIN_HEAD_BYTES = 2 ** 20    # heads with fewer score bytes (short sequences) run in one block
log = logging.getLogger("infllava_jax")
_LOGGED: set = set()


def dot_product_attention(q, k, v, *, mask=None, causal: bool = False, kv_mask=None, segment_ids=None,
                          scale: float | None = None, impl: str = "xla"):
    """softmax(q k^T * scale + mask) v with grouped-query heads.

    q: (B, T, N, H); k, v: (B, S, K, H) with N % K == 0 (query head n uses kv head n // (N/K)).
    Returns (B, T, N, H) in q.dtype. Rows whose every key is masked are undefined (padding rows).
    """
    B, T, N, H = q.shape
    K, S = k.shape[2], k.shape[1]
    if N % K:
        raise ValueError(f"{N} query heads are not a multiple of {K} kv heads")
    if causal and T != S:
        raise ValueError(f"causal attention needs as many queries as keys, got {T} and {S}")
    scale = H ** -0.5 if scale is None else scale
    if segment_ids is not None and (T != S or kv_mask is not None):
        raise ValueError("segment_ids are for self-attention over packed rows (T == S, no kv_mask)")
    impl = resolve(impl, q, general_mask=mask is not None, segments=segment_ids is not None)
    if impl == "cudnn":
        return attention_cudnn.attend(q, k, v, causal=causal, kv_mask=kv_mask, scale=scale)
    if impl == "splash":
        return attention_splash.attend(q, k, v, causal=causal, kv_mask=kv_mask, segment_ids=segment_ids, scale=scale)
    if segment_ids is not None:
        mask = segment_ids[:, :, None] == segment_ids[:, None, :] if mask is None else mask
    mask = dense_mask(B, T, S, mask, causal, kv_mask)
    if impl == "jax":
        m = None if mask is None else jnp.broadcast_to(mask, (B, T, S))[:, None]
        return jax.nn.dot_product_attention(q, k, v, mask=m, scale=scale)
    if impl == "chunked" and T > QUERY_CHUNK:
        return _query_chunked(q, k, v, mask, scale)
    return _xla(q, k, v, mask, scale)


def resolve(impl: str, q, general_mask: bool = False, segments: bool = False) -> str:
    """The implementation a call runs: "auto" by backend; a fused one that cannot take the call
    ("auto" only for dtype / head size; a general mask for both; segment ids for cudnn) becomes
    "chunked"."""
    if impl not in IMPLS:
        raise ValueError(f"attention impl={impl!r}; expected one of {IMPLS}")
    requested, why = impl, ""
    if impl == "auto":
        impl = {"gpu": "cudnn", "tpu": "splash"}.get(jax.default_backend(), "chunked")
        why = {"cudnn": attention_cudnn.unsupported, "splash": attention_splash.unsupported}.get(
            impl, lambda _: "")(q)
        why = why or ("" if impl in FUSED else f"no fused kernel on {jax.default_backend()}")
        impl = "chunked" if why and impl in FUSED else impl
    if impl in FUSED and general_mask:
        impl, why = "chunked", "a general mask (the KV-cache path)"
    if impl == "cudnn" and segments:
        impl, why = "chunked", "segment ids of packed rows (cuDNN takes no segments)"
    if requested in ("auto", *FUSED) and (requested, impl, why) not in _LOGGED:
        _LOGGED.add((requested, impl, why))
        log.info("attention %s -> %s on %s%s", requested, impl, jax.default_backend(), f" ({why})" if why else "")
    return impl


def dense_mask(B: int, T: int, S: int, mask, causal: bool, kv_mask):
    """The bool mask (broadcastable to (B, T, S)) that `mask`, `causal` and `kv_mask` describe,
    or None when nothing is masked."""
    parts = [m for m in (mask,
                         jnp.tril(jnp.ones((T, S), bool))[None] if causal else None,
                         None if kv_mask is None else kv_mask.astype(bool)[:, None, :]) if m is not None]
    if not parts:
        return None
    out = parts[0]
    for m in parts[1:]:
        out = out & m
    return out


def _xla(q, k, v, mask, scale):
    """Heads-major: the G = N/K query heads of a kv head are folded into the query axis,
    (B*K, G*T, H) x (B*K, S, H), so both products are batched GEMMs in their natural layout
    (with (B, T, K, G, H) operands XLA:CPU transposes the scores in the backward pass: a small
    Llama's attention forward + backward took 2x as long). The scale goes on q, and the softmax
    is normalised after the product with v ((T, H) divisions instead of (T, S)): one pass less
    over the scores, forward and backward. On CPU the B*K heads run in blocks (`_cpu_blocks`)."""
    B, T, N, H = q.shape
    K, S = k.shape[2], k.shape[1]
    G, X = N // K, B * K
    qh = (q * jnp.asarray(scale, q.dtype)).reshape(B, T, K, G, H).transpose(0, 2, 3, 1, 4).reshape(X, G * T, H)
    kh, vh = (a.transpose(0, 2, 1, 3).reshape(X, S, H) for a in (k, v))
    m = None if mask is None else jnp.broadcast_to(
        jnp.broadcast_to(mask, (B, T, S))[:, None, None], (B, K, G, T, S)).reshape(X, G * T, S)
    n = _cpu_blocks(X, G * T * S * 4)
    if n == 1:
        out = _softmax_av(qh, kh, vh, m)
    else:
        split = lambda a: None if a is None else a.reshape(n, X // n, *a.shape[1:])
        body = jax.checkpoint(lambda a: _softmax_av(*a))
        out = jax.lax.map(body, (split(qh), split(kh), split(vh), split(m))).reshape(X, G * T, H)
    return out.reshape(B, K, G, T, H).transpose(0, 3, 1, 2, 4).reshape(B, T, N, H)


def _softmax_av(qh, kh, vh, m):
    """softmax(qh kh^T, masked by m) vh over (X, ., H) heads, in fp32."""
    logits = jnp.einsum("xqh,xsh->xqs", qh, kh).astype(jnp.float32)
    if m is not None:
        logits = jnp.where(m, logits, jnp.finfo(jnp.float32).min)
    e = jnp.exp(logits - jax.lax.stop_gradient(logits.max(-1, keepdims=True)))   # softmax numerator
    out = jnp.einsum("xqs,xsh->xqh", e.astype(vh.dtype), vh)
    return (out / e.sum(-1, keepdims=True)).astype(vh.dtype)


@contextlib.contextmanager
def unblocked():
    """Compile attention as it runs on GPU/TPU, in one block, also on CPU: for what the
    compiled program is measured on, not run (the plan's memory, XLA's FLOP count, which sees a
    loop body once)."""
    global CPU_BLOCK_BYTES
    saved, CPU_BLOCK_BYTES = CPU_BLOCK_BYTES, float("inf")
    try:
        yield
    finally:
        CPU_BLOCK_BYTES = saved


def _cpu_blocks(heads: int, score_bytes: int) -> int:
    """How many sequential blocks the `heads` (each with `score_bytes` of fp32 scores) run in:
    on CPU, for heads of at least CPU_MIN_HEAD_BYTES, the fewest that keep one block's scores
    within CPU_BLOCK_BYTES (a divisor of `heads`; one head per block when a head alone is larger),
    each block rematerialised in the backward pass; elsewhere 1. Short sequences stay in one
    block: nothing measured gained there, and the small models (the study, the tests) keep the
    numerics they were measured with (the study's digit and side scores move with 1e-7 changes).
    XLA:CPU otherwise writes the whole score tensor to memory and reads it back: the ViT's 10
    views x 4 heads x 577^2 scores (53 MB) took 70 ms per layer forward, 34 ms in 20 blocks of
    2 heads (forward + backward 191 -> 118 ms), bit-identical (`benchmarks/vision_path.py`)."""
    if jax.default_backend() != "cpu" or heads * score_bytes <= CPU_BLOCK_BYTES or score_bytes < CPU_MIN_HEAD_BYTES:
        return 1
    return next((n for n in range(2, heads + 1) if heads % n == 0 and heads // n * score_bytes <= CPU_BLOCK_BYTES),
                heads)


def _query_chunked(q, k, v, mask, scale):
    """Blocks of QUERY_CHUNK queries in a rematerialised lax.map (exact, same result as "xla")."""
    B, T, N, H = q.shape
    n = -(-T // QUERY_CHUNK)
    pad = n * QUERY_CHUNK - T
    m = jnp.ones((B, T, k.shape[1]), bool) if mask is None else jnp.broadcast_to(mask, (B, T, k.shape[1]))
    qs = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0))).reshape(B, n, QUERY_CHUNK, N, H).swapaxes(0, 1)
    ms = jnp.pad(m, ((0, 0), (0, pad), (0, 0))).reshape(B, n, QUERY_CHUNK, -1).swapaxes(0, 1)
    block = jax.checkpoint(lambda qc, mc: _xla(qc, k, v, mc, scale))
    out = jax.lax.map(lambda a: block(*a), (qs, ms))
    return out.swapaxes(0, 1).reshape(B, n * QUERY_CHUNK, N, H)[:, :T]
