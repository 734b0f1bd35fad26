"""Analytic FLOPs of a train step, and model FLOPs utilisation (MFU).

Conventions: a matmul of (m, k) x (k, n) is 2mkn FLOPs; backward = 2x forward for trained
weights, 1x (activation gradients only) for frozen parts that gradients flow through, 0 for the
frozen vision tower (nothing before it trains); causal attention counts half the score matrix.
"""
from __future__ import annotations

import time
from typing import Sequence

import jax
import jax.numpy as jnp

from infllava_jax.config import InfLlavaConfig

# Dense bf16 peak per chip (vendor figures, no sparsity), matched against device_kind.
PEAK_FLOPS = {
    "H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12,
    "TPU v5p": 459e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v6 lite": 918e12, "TPU v4": 275e12,
}


def _vit_flops(c: InfLlavaConfig) -> float:
    v = c.vision
    T = c.tokens_per_image + 1
    layers = c.select_layer % (v.num_hidden_layers + 1)   # only the layers the feature needs
    per_layer = 2 * T * (4 * v.hidden_size ** 2 + 2 * v.hidden_size * v.intermediate_size) \
        + 4 * T * T * v.hidden_size
    patch = 2 * c.tokens_per_image * v.patch_size ** 2 * v.num_channels * v.hidden_size
    return layers * per_layer + patch


def _dem_flops(c: InfLlavaConfig) -> float:
    d = c.dem
    g2, D, W, N = d.g ** 2, d.hidden, d.width, d.num_crops
    if d.views != "both":  # DCM ablation: pooling only
        return 0.0
    ffn = 2 * 2 * (D * d.ffn_hidden + d.ffn_hidden * d.ffn_out)
    if d.use_fast_path:   # 2 g^2 queries (a and b), keys: one crop / S; k, v over N crops + S
        q = 2 * g2
        kv_tokens = (N + 1) * g2
        return q * (2 * D * W * 2 + 2 * 2 * W * g2 + ffn / 2) + kv_tokens * 2 * 2 * D * W
    maps = 2 * N * g2      # full: every position of both maps queries g^2 keys
    return maps * (2 * D * W * 4 + 2 * 2 * W * g2) + N * g2 * ffn


def _llm_flops_per_token(c: InfLlavaConfig, seq_len: int) -> float:
    m = c.llm
    hd = m.head_dim
    attn_proj = m.hidden_size * hd * (2 * m.num_attention_heads + 2 * m.num_key_value_heads)
    mlp = 3 * m.hidden_size * m.intermediate_size
    dense = 2 * (m.num_hidden_layers * (attn_proj + mlp) + m.hidden_size * m.vocab_size)
    attn = m.num_hidden_layers * 2 * 2 * m.num_attention_heads * hd * seq_len / 2   # causal: half
    return dense + attn


def train_step_flops(c: InfLlavaConfig, batch_size: int, seq_len: int, parts: Sequence[str]) -> float:
    """FLOPs of one optimizer step over `batch_size` sequences of `seq_len` spliced tokens when
    `parts` train."""
    passes = 1 if c.dem is None else c.dem.vit_passes()
    vision = passes * _vit_flops(c) * (3 if "vision_tower" in parts else 1)  # forward (x3 when trained)
    proj = 2 * c.tokens_per_image * (c.vision.hidden_size * c.llm.hidden_size + c.llm.hidden_size ** 2)
    adapter = 3 * (proj + (0 if c.dem is None else _dem_flops(c)))  # trained: forward + 2x backward
    llm_mult = 3 if "language_model" in parts else 2                        # stage 1: activation grads only
    llm = llm_mult * seq_len * _llm_flops_per_token(c, seq_len)
    return batch_size * (vision + adapter + llm)


def peak_flops() -> tuple[float, str]:
    """(peak FLOP/s of all the job's devices together, where the figure comes from): the published
    peak per chip x devices; where there is none (CPU), a large fp32 matmul measured once, which
    uses the whole host (its devices, real or faked by XLA_FLAGS, share its cores) x processes."""
    device = jax.devices()[0]
    kind = getattr(device, "device_kind", "")
    for name, peak in PEAK_FLOPS.items():
        if name.lower() in kind.lower():
            return peak * jax.device_count(), f"{kind}: dense bf16 peak {peak / 1e12:.0f} TFLOP/s x {jax.device_count()} devices"
    x = jnp.ones((1024, 1024), jnp.float32)
    f = jax.jit(lambda a: a @ a)
    f(x).block_until_ready()
    t = time.perf_counter()
    for _ in range(5):
        f(x).block_until_ready()
    peak = 5 * 2 * 1024 ** 3 / (time.perf_counter() - t)
    return peak * jax.process_count(), (f"{kind or device.platform}: measured fp32 matmul {peak / 1e9:.1f} GFLOP/s "
                                        f"per host (no published peak) x {jax.process_count()} hosts")
