"""The step loop never waits for the device: it runs under jax.transfer_guard("disallow") (an
implicit copy fails there), skipped steps are counted on the device and reported at log steps."""
import json
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from infllava_jax.splice import IGNORE_INDEX
from infllava_jax.training import loop
from tests.test_multihost import make_clean_dataset

STEPS, SKIPPED_STEP = 21, 13


class BlankOneStep:
    """The pipeline's iterator, but the micro-batches of step SKIPPED_STEP supervise nothing."""

    def __init__(self, it, accum):
        self.it, self.k, self.blank = it, 0, range((SKIPPED_STEP - 1) * accum, SKIPPED_STEP * accum)

    def __next__(self):
        b = next(self.it)
        if self.k in self.blank:
            b = {**b, "labels": np.full_like(b["labels"], IGNORE_INDEX)}
        self.k += 1
        return b

    def __getattr__(self, name):           # stats(), set_stats()
        return getattr(self.it, name)


@pytest.mark.slow   # a training loop run
def test_steps_run_under_the_transfer_guard_and_skips_are_counted(tmp_path, monkeypatch, caplog):
    """21 steps, logging every 10 and one skipped step: the host reads the device at the log
    steps only (every read of a jax.Array's value is recorded with the step it happens in), an
    implicit host->device copy fails during the steps, and the skipped step is counted."""
    data = make_clean_dataset(tmp_path / "data")
    cfg = tiny.get_config()
    cfg.mesh = {"fsdp": 4}
    cfg.data.synthetic, cfg.data.path, cfg.data.image_folder = False, str(data / "train.json"), str(data)
    cfg.data.max_len, cfg.total_steps, cfg.log_every, cfg.checkpoint_every = 160, STEPS, 10, 100
    cfg.export_final = False
    step_now, reads, guarded = [0], [], []
    array_type = type(jnp.zeros(()))
    value = array_type._value
    monkeypatch.setattr(array_type, "_value", property(lambda x: (reads.append(step_now[0]), value.fget(x))[1]))
    original = {f: getattr(loop.Trainer, f) for f in ("_data", "run_step", "__init__")}

    def run_step(self, step, batch):
        step_now[0] = step
        return original["run_step"](self, step, batch)

    def probe(step, m):                      # an implicit host->device copy fails in the loop
        try:
            m["loss"] + np.ones((), np.float32)
        except Exception as e:               # JaxRuntimeError: Disallowed host-to-device transfer
            guarded.append("Disallowed host-to-device" in str(e))

    def init(self, *a, **kw):
        original["__init__"](self, *a, **kw)
        self.hooks.append(loop.Hook(1, probe))

    monkeypatch.setattr(loop.Trainer, "_data", lambda self, c: BlankOneStep(original["_data"](self, c), self.accum))
    monkeypatch.setattr(loop.Trainer, "run_step", run_step)
    monkeypatch.setattr(loop.Trainer, "__init__", init)
    with caplog.at_level(logging.WARNING, logger="infllava_jax"):
        summary = loop.train(cfg, tmp_path / "run")
    assert summary["steps"] == STEPS and guarded == [True] * STEPS
    assert {s for s in reads if s > 0} == {10, 20, 21}, sorted(set(reads))
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["skipped_steps"]) for r in rows] == [(10, 0), (20, 1), (21, 1)]
    assert any("1 of the steps up to 20 skipped" in r.getMessage() for r in caplog.records)
    assert jax.config.jax_threefry_partitionable
