"""Pallas splash attention (TPU): `make_splash_mha` over a causal (or full) `MultiHeadMask`,
padding as `SegmentIds`, grouped-query heads as kv heads, `vmap` over the batch and `shard_map`
over the ambient mesh (batch over `act_batch`'s axes, heads over `act_heads`'s) with the kernel's
`manual_sharding_spec`. Off TPU the kernel runs in Pallas interpret mode (slow: for tests).

Packed rows pass their `segment_ids` (B, T) (0: padding) as the kernel's SegmentIds instead of
the padding mask: causal inside each segment, no token sees another segment.

Lengths are padded to a multiple of 128 (the kernel's smallest block) with segment id 0 for the
added keys, so any length works (the ViT's 577 tokens run as 640). Queries: segment id = their
key's (causal self-attention: a padding query sees padding keys, never an empty row) or 1 (no
causal mask: every query sees the real keys). q is scaled before the kernel (it has no scale).
Supported: float32 and bfloat16; any head size the installed kernel takes.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks
from jax.sharding import NamedSharding, PartitionSpec as P

from infllava_jax.sharding import LOGICAL_RULES

DTYPES = (jnp.float32, jnp.bfloat16)
LANES = 128
BLOCKS = (512, 256, 128)


def unsupported(q) -> str:
    return "" if q.dtype in DTYPES else f"splash attention takes float32 or bfloat16, not {q.dtype}"


def attend(q, k, v, *, causal: bool, kv_mask=None, scale: float, interpret: bool | None = None,
           segment_ids=None):
    """q: (B, T, N, H), k, v: (B, S, K, H); kv_mask (B, S) bool or None, or segment_ids (B, T)
    of packed rows (T == S) -> (B, T, N, H)."""
    if unsupported(q):
        raise ValueError(f"attention impl='splash': {unsupported(q)}")
    B, T, N, H = q.shape
    S, K = k.shape[1], k.shape[2]
    Tp, Sp = -(-T // LANES) * LANES, -(-S // LANES) * LANES
    kv_real = jnp.ones((B, S), jnp.int32) if kv_mask is None else kv_mask.astype(jnp.int32)
    kv_real = kv_real if segment_ids is None else segment_ids.astype(jnp.int32)
    kv_seg = jnp.pad(kv_real, ((0, 0), (0, Sp - S)))
    q_seg = kv_seg if causal or segment_ids is not None else jnp.ones((B, Tp), jnp.int32)
    heads_first = lambda x, L: jnp.pad(x, ((0, 0), (0, L - x.shape[1]), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
    qp = heads_first((q * jnp.asarray(scale, q.dtype)).astype(q.dtype), Tp)
    kp, vp = heads_first(k, Sp), heads_first(v, Sp)
    batch_axes, head_axes = _mesh_axes(B, N, K)
    head_shards = _size(head_axes)
    kernel = make_kernel(N, Tp, Sp, causal, head_shards,
                         jax.default_backend() != "tpu" if interpret is None else interpret)
    out = _run(kernel, qp, kp, vp, q_seg, kv_seg, batch_axes, head_axes)
    return out.transpose(0, 2, 1, 3)[:, :T]


def make_kernel(N: int, T: int, S: int, causal: bool, head_shards: int, interpret: bool):
    mask = masks.CausalMask((T, S)) if causal else masks.FullMask((T, S))
    bq, bkv = _block(T), _block(S)
    sizes = splash.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv, block_q_dkv=bq,
                              block_kv_dkv=bkv, block_kv_dkv_compute=bkv, block_q_dq=bq, block_kv_dq=bkv)
    return splash.make_splash_mha(masks.MultiHeadMask([mask] * N), block_sizes=sizes,
                                  head_shards=head_shards, q_seq_shards=1, interpret=interpret)


def _run(kernel, q, k, v, q_seg, kv_seg, batch_axes, head_axes):
    """vmap of the kernel over the batch; under a mesh, inside shard_map (one shard per device)."""
    def local(kernel, q, k, v, q_seg, kv_seg):
        return jax.vmap(lambda *a: kernel(*a[:3], segment_ids=splash.SegmentIds(*a[3:])))(q, k, v, q_seg, kv_seg)

    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return local(kernel, q, k, v, q_seg, kv_seg)
    qkv, seg = P(batch_axes, head_axes, None, None), P(batch_axes, None)
    kernel_spec = kernel.manual_sharding_spec(NamedSharding(mesh, P(head_axes, None)))
    return jax.shard_map(local, mesh=mesh, in_specs=(kernel_spec, qkv, qkv, qkv, seg, seg), out_specs=qkv,
                         check_vma=False)(kernel, q, k, v, q_seg, kv_seg)


def _mesh_axes(B: int, N: int, K: int):
    """(batch axes, head axes) of the ambient mesh from the logical rules; an axis that does not
    divide the size stays unsharded."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return None, None
    rules = dict(LOGICAL_RULES)
    as_tuple = lambda r: (r,) if isinstance(r, str) else tuple(r or ())
    pick = lambda name: tuple(a for a in as_tuple(rules[name]) if a in mesh.axis_names) or None
    batch, heads = pick("act_batch"), pick("act_heads")
    batch = batch if batch and B % _size(batch, mesh) == 0 else None
    heads = heads if heads and N % _size(heads, mesh) == 0 and K % _size(heads, mesh) == 0 else None
    return batch, heads


def _size(axes, mesh=None) -> int:
    mesh = mesh or jax.sharding.get_abstract_mesh()
    return int(np.prod([mesh.shape[a] for a in axes])) if axes else 1


def _block(L: int) -> int:
    return next(b for b in BLOCKS if L % b == 0)
