"""MFU's two halves (training/flops.py): the analytic FLOPs of a step against XLA's own count of
the compiled program, and the peak they are divided by."""
import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from infllava_jax import attention, presets
from infllava_jax.params import abstract_params
from infllava_jax.training import flops, step as step_lib


@pytest.mark.slow   # compiles an unrolled step
def test_analytic_step_flops_match_xlas_count():
    """A stage-2 step of a model wide enough for its matmuls to dominate, compiled with no loop
    (XLA's cost analysis counts a loop body once): XLA counts what the analytic figure leaves out
    (element-wise work, the masked half of causal scores), so it is a few % above it, never below."""
    t = presets.tiny(scan_layers=False, attention_impl="xla")
    cfg = dataclasses.replace(
        t, vision=dataclasses.replace(t.vision, hidden_size=256, intermediate_size=1024),
        llm=dataclasses.replace(t.llm, hidden_size=512, intermediate_size=1536, vocab_size=2048),
        dem=dataclasses.replace(t.dem, hidden=256, ffn_hidden=64, ffn_out=128))
    b, L = 2, 256
    H, W = cfg.image_size
    batch = {"input_ids": jax.ShapeDtypeStruct((1, b, L), jnp.int32), "labels": jax.ShapeDtypeStruct((1, b, L), jnp.int32),
             "attention_mask": jax.ShapeDtypeStruct((1, b, L), jnp.int32),
             "pixel_values": jax.ShapeDtypeStruct((1, b, H, W, 3), jnp.float32)}
    parts = step_lib.trainable_parts("stage2")
    tx, _ = step_lib.make_optimizer(1e-3, 10)
    state = jax.eval_shape(lambda p: step_lib.init_state(p, parts, tx), abstract_params(cfg))
    with attention.unblocked():
        compiled = jax.jit(step_lib.make_grad_fn(cfg, loss_chunk=L)).lower(state, batch).compile()
    xla = compiled.cost_analysis()["flops"]
    seq = L + cfg.tokens_per_image - 1                      # the image token replaced by its features
    analytic = flops.train_step_flops(cfg, b, seq, parts)
    assert 1.0 <= xla / analytic <= 1.1, (xla / 1e9, analytic / 1e9)


def test_cpu_peak_is_the_hosts_not_one_per_fake_device():
    """On CPU the MFU denominator is a measured matmul rate: the host's, once per process, however
    many devices XLA_FLAGS fakes on it (they share its cores)."""
    assert jax.device_count() == 8 and jax.process_count() == 1
    total, note = flops.peak_flops()
    f = jax.jit(lambda a: a @ a)
    x = jnp.ones((1024, 1024), jnp.float32)
    f(x).block_until_ready()
    rates = []
    for _ in range(3):
        t0 = time.perf_counter()
        f(x).block_until_ready()
        rates.append(2 * 1024 ** 3 / (time.perf_counter() - t0))
    assert "measured" in note and 1 / 3 < total / np.median(rates) < 3, (total, rates, note)
