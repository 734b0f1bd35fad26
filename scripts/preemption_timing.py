"""Time from a preemption signal to the exit of train.py (docs/preemption.md).

    python scripts/preemption_timing.py --workdir /tmp/preempt [--signal SIGTERM] [--after 3]

Starts `train.py --config configs/tiny.py` (the demo dataset, 60 steps, no periodic checkpoint
before the signal), sends the signal once metrics.jsonl holds step --after, and prints one row:
seconds from the signal to the "stopped by" line (the step in flight, the checkpoint written and
complete) and to the process's exit, with the step it stopped at and its exit status.
"""
from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _wait_for_step(metrics: Path, step: int, proc: subprocess.Popen, log: Path) -> None:
    while not (metrics.exists() and any(json.loads(x)["step"] >= step for x in metrics.read_text().splitlines()
                                        if x.strip())):
        if proc.poll() is not None:
            sys.exit(f"train.py ended with {proc.returncode} before step {step}:\n{log.read_text()[-3000:]}")
        time.sleep(0.02)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", required=True, help="emptied first; the demo data go to WORKDIR/../data")
    ap.add_argument("--signal", default="SIGTERM", choices=("SIGTERM", "SIGUSR1", "SIGINT"))
    ap.add_argument("--after", type=int, default=3, help="send the signal once this step is logged")
    ap.add_argument("--config", default="configs/tiny.py")
    a = ap.parse_args(argv)
    w = Path(a.workdir).absolute()
    shutil.rmtree(w, ignore_errors=True)
    w.mkdir(parents=True)
    log = w / "train.log"
    cmd = [sys.executable, str(ROOT / "train.py"), "--config", a.config, "--workdir", str(w),
           "--config.log_every=1", "--config.checkpoint_every=1000", "--config.export_final=False"]
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    _wait_for_step(w / "metrics.jsonl", a.after, proc, log)
    proc.send_signal(getattr(signal, a.signal))
    t0, t_line = time.perf_counter(), None
    while proc.poll() is None:
        if t_line is None and "train.py: stopped by" in log.read_text():
            t_line = time.perf_counter() - t0
        time.sleep(0.01)
    t_exit = time.perf_counter() - t0
    text = log.read_text()
    line = next((x for x in text.splitlines() if x.startswith("train.py: stopped by")), "")
    step = line.split(" at step ")[1].split(";")[0] if line else "-"
    print(f"| {a.config} | {a.signal} after step {a.after} | stopped at step {step} | "
          f"{t_line if t_line is not None else float('nan'):.2f} s to the line | {t_exit:.2f} s to exit | "
          f"exit {proc.returncode} |")
    return 0 if line else 1


if __name__ == "__main__":
    raise SystemExit(main())
