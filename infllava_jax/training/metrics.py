"""Metrics: `WORKDIR/metrics.jsonl` (one JSON object per logged step), TensorBoard event files,
a progress line with rate and ETA, and the throughput meter (tokens/s, MFU).

A resumed run (`start` > 0: the restored step) holds each step once: metrics.jsonl is cut back
to the rows of steps <= start, and the new TensorBoard event file starts with a purge of the
steps after `start` (tensorboardX `purge_step`: TensorBoard drops the older files' later steps)."""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from tensorboardX import SummaryWriter


log = logging.getLogger("infllava_jax")


class MetricsWriter:
    def __init__(self, workdir: str | Path, total_steps: int, enabled: bool = True, start: int = 0):
        self.enabled = enabled                     # only process 0 writes
        self.total_steps = total_steps
        self.path = Path(workdir) / "metrics.jsonl"
        tb_dir = Path(workdir) / "tensorboard"
        earlier = enabled and tb_dir.is_dir() and any(tb_dir.glob("events.out.tfevents.*"))
        if enabled:
            cut_back(self.path, start)
        self.tb = SummaryWriter(str(tb_dir), purge_step=start + 1 if earlier else None) if enabled else None
        self._t0, self._step0 = time.perf_counter(), None

    def write(self, step: int, metrics: dict) -> None:
        """`metrics` of `step` (plain Python numbers); also logs a progress line with ETA."""
        now = time.perf_counter()
        if self._step0 is None:
            self._t0, self._step0 = now, step
        rate = (step - self._step0) / max(now - self._t0, 1e-9)
        eta = (self.total_steps - step) / rate if rate > 0 else float("nan")
        log.info("step %d/%d  loss %.4f  lr %.2e  grad_norm %.3f  %.0f tok/s  mfu %.2f%%  %.2f steps/s  "
                     "ETA %s", step, self.total_steps, metrics["loss"], metrics["lr"], metrics["grad_norm"],
                     metrics["tokens_per_s"], 100 * metrics["mfu"], rate, _fmt(eta))
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        for k, v in metrics.items():
            if isinstance(v, (int, float)):
                self.tb.add_scalar(k, v, step)
        self.tb.flush()

    def write_eval(self, step: int, scores: dict) -> None:
        """Evaluation scores of `step` (one JSON line with `step` and the scores)."""
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **scores}) + "\n")
        for k, v in scores.items():
            self.tb.add_scalar(k, v, step)
        self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def cut_back(path: Path, step: int) -> None:
    """Keep the rows of steps <= `step` in the JSONL file `path` (atomically; a damaged last line,
    from a run killed while writing it, goes too)."""
    if not path.exists():
        return
    keep, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            dropped += 1
            continue
        if row.get("step", 0) <= step:
            keep.append(line)
        else:
            dropped += 1
    if dropped:
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(x + "\n" for x in keep))
        tmp.replace(path)
        log.info("metrics.jsonl: %d rows after step %d dropped (the run resumes from step %d)", dropped, step, step)


class ThroughputMeter:
    """Tokens and model FLOPs per second since the last report; `restart()` leaves out what is
    not training (compiling, evaluating)."""

    def __init__(self, peak_flops: float):
        self.peak_flops = peak_flops       # of all devices together
        self.restart()

    def restart(self) -> None:
        self._t, self._tokens, self._flops = time.perf_counter(), 0, 0.0

    def add(self, tokens: int, flops: float) -> None:
        self._tokens += tokens
        self._flops += flops

    def report(self) -> dict:
        """{"tokens_per_s", "mfu"} since the last report (or restart), then restarts."""
        dt = max(time.perf_counter() - self._t, 1e-9)
        out = {"tokens_per_s": self._tokens / dt, "mfu": self._flops / dt / self.peak_flops}
        self.restart()
        return out


def _fmt(seconds: float) -> str:
    if seconds != seconds:  # nan
        return "?"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}"
