"""Next-token cross-entropy that never materialises the full (B, L, V) fp32 logits.

The vocabulary projection runs chunk by chunk over the sequence inside a rematerialised scan:
only one (B, chunk, V) block of logits exists at a time, forward and backward. A sequence of
one chunk or less runs without the scan and without recomputing its logits. With `positions`
K > 0 the projection runs only at the first K supervised positions of each row (stage-2 VQA
records supervise a few answer tokens of hundreds): B x K rows instead of B x L, the same sum.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from infllava_jax.splice import IGNORE_INDEX


def shift_labels(labels, segment_ids=None):
    """Position t predicts token t+1: targets (B, L) with the last position IGNORE. Packed rows
    (`segment_ids`): the last token of a segment predicts nothing (never the next segment's first)."""
    pad = jnp.full((labels.shape[0], 1), IGNORE_INDEX, labels.dtype)
    targets = jnp.concatenate([labels[:, 1:], pad], axis=1)
    if segment_ids is None:
        return targets
    same = jnp.concatenate([segment_ids[:, 1:] == segment_ids[:, :-1], jnp.zeros(pad.shape, bool)], axis=1)
    return jnp.where(same, targets, IGNORE_INDEX)


def cross_entropy_sum(hidden, head_kernel, targets, chunk: int = 512, positions: int = 0):
    """Sum of -log p(target) over positions with target != IGNORE, and their count.

    hidden (B, L, D) final normed states; head_kernel (D, V); targets (B, L) (already shifted).
    positions K > 0: only the supervised positions, gathered (the first K of each row, in order);
    exact, since a batch with a row of more than K takes the whole-sequence path (a lax.cond:
    one of the two runs).
    """
    if not 0 < positions < hidden.shape[1]:
        return _every_position(hidden, targets, head_kernel, chunk)
    fits = jnp.max(jnp.sum(targets != IGNORE_INDEX, axis=1)) <= positions
    return jax.lax.cond(fits, lambda h, t: first_supervised_nll(h, t, head_kernel, positions),
                        lambda h, t: _every_position(h, t, head_kernel, chunk), hidden, targets)


def first_supervised_nll(hidden, targets, head_kernel, positions: int):
    """(sum of -log p(target), count) over the first `positions` supervised positions of each row,
    gathered (B x positions rows through the head): the whole sum when no row has more."""
    idx = jnp.argsort(targets == IGNORE_INDEX, axis=1, stable=True)[:, :positions]   # supervised first, in order
    return _chunk_nll(jnp.take_along_axis(hidden, idx[..., None], axis=1), jnp.take_along_axis(targets, idx, axis=1),
                      head_kernel)


def _every_position(hidden, targets, head_kernel, chunk: int):
    B, L, D = hidden.shape
    if L <= chunk:   # one chunk: the logits exist once either way; no scan, no recomputation
        return _chunk_nll(hidden, targets, head_kernel)
    n = -(-L // chunk)
    pad = n * chunk - L
    h = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0))).reshape(B, n, chunk, D).swapaxes(0, 1)
    t = jnp.pad(targets, ((0, 0), (0, pad)), constant_values=IGNORE_INDEX).reshape(B, n, chunk).swapaxes(0, 1)

    def body(carry, xs):
        s, c = jax.checkpoint(_chunk_nll)(*xs, head_kernel)
        return (carry[0] + s, carry[1] + c), None

    (total, count), _ = jax.lax.scan(body, (jnp.float32(0), jnp.int32(0)), (h, t))
    return total, count


def _chunk_nll(h, tc, head_kernel):
    """(sum of -log p(target), count) over one (B, c, D) block of hidden states."""
    # rows x D: the head's weight gradient is one GEMM (layers.Dense)
    logits = (h.reshape(-1, h.shape[-1]) @ head_kernel.astype(h.dtype)).astype(jnp.float32)
    logits = logits.reshape(*tc.shape, -1)
    valid = tc != IGNORE_INDEX
    gold = jnp.take_along_axis(logits, jnp.where(valid, tc, 0)[..., None], axis=-1)[..., 0]
    nll = jax.nn.logsumexp(logits, axis=-1) - gold
    return jnp.sum(jnp.where(valid, nll, 0.0)), jnp.sum(valid)
