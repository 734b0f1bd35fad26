"""Preemption and interruption (docs/preemption.md, training/preemption.py): SIGTERM, the second
signal (SIGUSR1) and Ctrl-C stop every process at one step boundary with a checkpoint there; the
resumed run recomputes no step and its trajectory (every logged value, the final parameters) is
bit-identical to an uninterrupted run; metrics.jsonl and TensorBoard hold each step once; a kill -9
inside the preemption checkpoint's write leaves the previous one restorable; an unreadable newest
checkpoint falls back to the one before; a peer that hangs inside a checkpoint write ends the
survivor within its deadline.

The signals are sent from outside, as a scheduler sends them, once metrics.jsonl holds step
SIGNAL_AFTER (the run then stops at a later step it chooses). train.py runs in subprocesses on
fake CPU devices; two processes meet over localhost (tests/test_multihost.py's pattern).
"""
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from infllava_jax.training.metrics import MetricsWriter
from infllava_jax.training.preemption import signal_number
from tests.test_multihost import env, free_port, make_clean_dataset

ROOT = Path(__file__).resolve().parents[1]
STEPS = 8
SIGNAL_AFTER = 3           # the signal goes out once metrics.jsonl holds this step (4 steps of margin)
EXACT = ("loss", "grad_norm", "lr", "supervised_tokens", "seq_len", "skipped_steps", "bad_samples")
VARIANTS = {"plain": [], "packing+lora": ["--config.data.packing=True", "--config.lora.rank=4"]}

# run train.py with TrainCheckpoints.save patched (IN_SAVE=MODE:STEP:PROCESS): in the save of a
# step >= STEP, process PROCESS kills itself (kill) once the write has started (Orbax's temporary
# directory exists, the write goes on in the background), or hangs before writing its part
# (hang; alive, heartbeats still flow)
IN_SAVE = """
import os, runpy, signal, sys, time
import jax
from infllava_jax.training import checkpoints
mode, at, who = os.environ["IN_SAVE"].split(":")
original = checkpoints.TrainCheckpoints.save
def save(self, step, state, counts):
    now = step >= int(at) and jax.process_index() == int(who)
    if now and mode == "hang":
        print(f"IN_SAVE hang at step {step}", file=sys.stderr, flush=True)
        time.sleep(3600)
    original(self, step, state, counts)
    if now and mode == "kill":
        print(f"IN_SAVE kill at step {step}", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
checkpoints.TrainCheckpoints.save = save
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


# ----------------------------------------------------------------------------- helpers

@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_clean_dataset(tmp_path_factory.mktemp("preemption") / "data")


def command(workdir, data, variant, processes=1, *extra, driver=None):
    """train.py's command lines (one per process); `driver`: run train.py under that code."""
    multi = [f"--coordinator_address=localhost:{free_port()}", f"--num_processes={processes}"] if processes > 1 else []
    py = [sys.executable, "-c", driver] if driver else [sys.executable]
    return [py + [str(ROOT / "train.py"), "--config", str(ROOT / "configs" / "tiny.py"), "--workdir", str(workdir),
                  "--config.data.synthetic=False", f"--config.data.path={data / 'train.json'}",
                  f"--config.data.image_folder={data}", f"--config.total_steps={STEPS}", "--config.log_every=1",
                  "--config.checkpoint_every=3", "--config.global_batch=8", f"--config.micro_batch={8 // processes}",
                  "--config.data.max_len=256", "--config.model.grid=0", *VARIANTS[variant], *multi,
                  *([f"--process_id={i}"] if multi else []), *extra] for i in range(processes)]


def start(workdir, cmds, extra_env=None):
    Path(workdir).mkdir(parents=True, exist_ok=True)
    procs = []
    for i, cmd in enumerate(cmds):
        log = Path(workdir) / f"process_{i}.log"
        with open(log, "ab") as f:
            procs.append((subprocess.Popen(cmd, cwd=ROOT, env={**env(8 // len(cmds)), **(extra_env or {})},
                                           stdout=f, stderr=subprocess.STDOUT), log))
    return procs


def finish(procs, timeout=600) -> list[tuple[int, str]]:
    try:
        return [(p.wait(timeout=timeout), log.read_text()) for p, log in procs]
    finally:
        for p, _ in procs:
            if p.poll() is None:
                p.kill()


def run(workdir, cmds, codes=(0,)):
    out = finish(start(workdir, cmds))
    for rc, text in out:
        assert rc in codes, f"train.py exited with {rc}:\n{text[-4000:]}"
    return out


def signal_at(workdir, procs, sig, to=(0,), after=SIGNAL_AFTER):
    """Send `sig` to the processes `to` once metrics.jsonl holds step `after` (no fixed sleeps:
    the file is polled); -> the time it was sent."""
    metrics, deadline = Path(workdir) / "metrics.jsonl", time.time() + 600
    while not (metrics.exists() and any(json.loads(x)["step"] >= after for x in metrics.read_text().splitlines())):
        assert time.time() < deadline and all(p.poll() is None for p, _ in procs), procs[0][1].read_text()[-3000:]
        time.sleep(0.05)
    for i in to:
        procs[i][0].send_signal(sig)
    return time.time()


def wait_for(procs, i, text):
    """Until process i's log holds `text` (a log line, not a fixed sleep)."""
    deadline = time.time() + 600
    while text not in procs[i][1].read_text():
        assert time.time() < deadline and all(p.poll() is None for p, _ in procs), procs[i][1].read_text()[-3000:]
        time.sleep(0.05)


def rows(workdir) -> list[dict]:
    return [json.loads(x) for x in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def tensorboard_steps(workdir) -> dict:
    """{tag: {step: [values]}} as TensorBoard shows the event files: in file order, a SessionLog
    START event at step s (tensorboardX purge_step) drops the earlier files' steps >= s."""
    from tensorboardX.proto import event_pb2
    out: dict = {}
    files = sorted((Path(workdir) / "tensorboard").glob("events.out.tfevents.*"),
                   key=lambda p: (int(p.name.split(".")[3]), p.stat().st_mtime))
    for f in files:
        data, i = f.read_bytes(), 0
        while i < len(data):
            (n,) = struct.unpack("<Q", data[i:i + 8])
            e = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
            i += 16 + n
            if e.HasField("session_log") and e.session_log.status == event_pb2.SessionLog.START:
                for by_step in out.values():
                    for s in [s for s in by_step if s >= e.step]:
                        del by_step[s]
            for v in e.summary.value:
                out.setdefault(v.tag, {}).setdefault(e.step, []).append(v.simple_value)
    return out


def check_once(workdir, want_rows):
    """metrics.jsonl: each step once, bit-identical to `want_rows`; TensorBoard: each step once."""
    got = rows(workdir)
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    for a, b in zip(got, want_rows):
        assert {k: a[k] for k in EXACT} == {k: b[k] for k in EXACT}, (a, b)
    tb = tensorboard_steps(workdir)
    assert {s: len(v) for s, v in tb["loss"].items()} == {s: 1 for s in range(1, STEPS + 1)}
    assert [tb["loss"][s][0] for s in range(1, STEPS + 1)] == [np.float32(r["loss"]) for r in want_rows]


def check_same_params(a, b):
    from infllava_jax import InfLlava
    x, y = InfLlava.from_pretrained(Path(a) / "final").params, InfLlava.from_pretrained(Path(b) / "final").params
    import jax
    for (path, u), v in zip(jax.tree_util.tree_leaves_with_path(x), jax.tree.leaves(y)):
        assert np.array_equal(np.asarray(u), np.asarray(v)), jax.tree_util.keystr(path)


_REFERENCE = {}


def reference(tmp_path_factory, data, variant, processes=1):
    """The uninterrupted run (checkpoints at 3, 6, 8; WORKDIR/final), made once per session."""
    key = (variant, processes)
    if key not in _REFERENCE:
        w = tmp_path_factory.mktemp(f"ref_{variant}_{processes}")
        run(w, command(w, data, variant, processes))
        _REFERENCE[key] = w
    return _REFERENCE[key]


def stopped_step(text: str, sig: str, runs: int = 1) -> int:
    """The step of the last "stopped by" line in a log of `runs` stopped runs (one line each)."""
    lines = [x for x in text.splitlines() if x.startswith("train.py: stopped by")]
    assert len(lines) == runs, text[-3000:]
    assert "run the same command to resume from it" in lines[-1] and (sig in lines[-1]), lines
    return int(lines[-1].split(" at step ")[1].split(";")[0])


# ----------------------------------------------------------------------------- fast

def test_signal_names():
    assert signal_number("USR1") == signal_number("SIGUSR1") == signal.SIGUSR1
    assert signal_number("") is None
    for bad in ("SIGFOO", "KILL", "9"):
        with pytest.raises(ValueError, match=f"preemption_signal='{bad}' is not a signal a process can catch"):
            signal_number(bad)
    # train.py: one line, exit 2, nothing created
    p = subprocess.run([sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / "configs" / "tiny.py"),
                        "--workdir", "/nonexistent-preemption/w", "--config.preemption_signal=SIGFOO"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert "train.py: error: config.preemption_signal='SIGFOO' is not a signal a process can catch" in p.stderr
    assert not Path("/nonexistent-preemption").exists()


def test_launch_scripts_configure_the_signal():
    """Slurm sends the signal train.py is told to handle; the TPU script passes the same flag;
    docs/preemption.md's timing command parses."""
    sbatch = (ROOT / "scripts" / "train_slurm.sbatch").read_text()
    assert "#SBATCH --signal=USR1@120" in sbatch and "PREEMPTION_SIGNAL=${PREEMPTION_SIGNAL:-SIGUSR1}" in sbatch
    assert '--config.preemption_signal="${PREEMPTION_SIGNAL:-SIGUSR1}"' in (ROOT / "scripts" / "train_tpu_pod.sh").read_text()
    p = subprocess.run([sys.executable, str(ROOT / "scripts" / "preemption_timing.py"), "--help"], capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0 and "--signal" in p.stdout


def test_second_ctrl_c_ends_at_once(tmp_path):
    """The first Ctrl-C asks for a stop at the step boundary; a second one ends the process at
    once with 130 and one line, no KeyboardInterrupt traceback."""
    code = ("import os, signal, time\nfrom infllava_jax.training.preemption import Preemption\n"
            "p = Preemption('SIGUSR1')\nos.kill(os.getpid(), signal.SIGINT)\nassert p.reached(1)\n"
            "assert p.exit_code == 130\nos.kill(os.getpid(), signal.SIGINT)\ntime.sleep(60)\n")
    t0 = time.time()
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert p.returncode == 130 and time.time() - t0 < 30, p.stderr
    assert "SIGINT: stopping at the end of this step" in p.stderr and "second Ctrl-C: stopping now" in p.stderr
    assert "Traceback" not in p.stderr and "KeyboardInterrupt" not in p.stderr


def test_metrics_resume_holds_each_step_once(tmp_path):
    """A run logged steps 1..5 (checkpoint at 3), then died; the resumed writer (start=3) cuts
    metrics.jsonl back to steps <= 3 and TensorBoard shows the new 4, 5 once."""
    w = MetricsWriter(tmp_path, 8)
    m = {"loss": 1.0, "lr": 0.1, "grad_norm": 2.0, "tokens_per_s": 1.0, "mfu": 0.0}
    for s in range(1, 6):
        w.write(s, {**m, "loss": float(s)})
    w.close()
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 6, "lo')                               # killed while writing a line
    time.sleep(1.1)                                                # the next event file's name (whole seconds)
    w = MetricsWriter(tmp_path, 8, start=3)
    assert [r["step"] for r in rows(tmp_path)] == [1, 2, 3]
    for s in range(4, 9):
        w.write(s, {**m, "loss": 10.0 * s})
    w.close()
    assert [r["loss"] for r in rows(tmp_path)] == [1, 2, 3, 40, 50, 60, 70, 80]
    tb = tensorboard_steps(tmp_path)["loss"]
    assert tb == {1: [1], 2: [2], 3: [3], 4: [40], 5: [50], 6: [60], 7: [70], 8: [80]}


def test_restore_latest_falls_back_and_never_starts_silently_from_zero(tmp_path, caplog):
    import jax
    import jax.numpy as jnp

    from infllava_jax.training.checkpoints import TrainCheckpoints
    ckpts = TrainCheckpoints(tmp_path, keep=3, async_save=False)
    for step in (1, 2, 3):
        ckpts.save(step, {"w": jnp.full((4,), float(step))}, {"good": step})
    ckpts.close()
    target = {"w": jax.ShapeDtypeStruct((4,), jnp.float32)}

    def damage(step):
        for f in (tmp_path / "checkpoints" / str(step) / "state").rglob("*"):
            if f.is_file():
                f.write_bytes(b"damaged")

    damage(3)
    ckpts = TrainCheckpoints(tmp_path, keep=3, async_save=False)
    with caplog.at_level("WARNING", logger="infllava_jax"):
        step, state, counts = ckpts.restore_latest(target)
    assert (step, state["w"].tolist(), counts) == (2, [2.0] * 4, {"good": 2})
    assert f"checkpoint {tmp_path / 'checkpoints' / '3'} is unreadable" in caplog.text
    assert (tmp_path / "checkpoints" / "3.unreadable").is_dir() and ckpts.latest_step() == 2
    ckpts.save(3, {"w": jnp.full((4,), 30.0)}, {"good": 30})      # the step is written again
    assert ckpts.restore_latest(target)[0] == 3
    ckpts.close()
    for step in (1, 2, 3):
        damage(step)
    with pytest.raises(Exception):                                  # none restores: the error, not step 0
        TrainCheckpoints(tmp_path, keep=3, async_save=False).restore_latest(target)
    assert TrainCheckpoints(tmp_path / "new").restore_latest(target) == (0, None, None)


# ----------------------------------------------------------------------------- one process

@pytest.mark.slow
@pytest.mark.parametrize("variant,sig", [("plain", signal.SIGTERM), ("packing+lora", signal.SIGINT)])
def test_signal_stops_and_resumes_bit_identical(tmp_path_factory, data, variant, sig):
    """SIGTERM (exit 0) / Ctrl-C (exit 130): the run stops at the next step boundary with a
    checkpoint there and one line; the same command resumes from that step (none recomputed):
    every logged value and the final parameters are those of the uninterrupted run."""
    ref = reference(tmp_path_factory, data, variant)
    w = tmp_path_factory.mktemp("w")
    cmd = command(w, data, variant)
    procs = start(w, cmd)
    t0 = signal_at(w, procs, sig)
    ((rc, text),) = finish(procs)
    elapsed = time.time() - t0
    assert rc == (130 if sig == signal.SIGINT else 0), text[-3000:]
    assert "Traceback" not in text and "KeyboardInterrupt" not in text, text[-3000:]
    step = stopped_step(text, sig.name)
    assert SIGNAL_AFTER < step < STEPS and (w / "checkpoints" / str(step)).is_dir()
    assert [r["step"] for r in rows(w)] == list(range(1, step + 1))
    print(f"{sig.name}: signal to exit {elapsed:.1f} s (stopped at step {step})")
    ((_, text),) = run(w, cmd)
    assert f"resumed from {w / 'checkpoints' / str(step)} at step {step}" in text
    check_once(w, rows(ref))
    check_same_params(ref, w)


@pytest.mark.slow
def test_kill_9_inside_the_preemption_checkpoint(tmp_path_factory, data):
    """SIGTERM, then kill -9 while the preemption checkpoint is being written: the restart
    ignores the half-written one, resumes from the checkpoint before it, cuts metrics.jsonl back
    and ends bit-identical to the uninterrupted run."""
    ref = reference(tmp_path_factory, data, "plain")
    w = tmp_path_factory.mktemp("w")
    procs = start(w, command(w, data, "plain", driver=IN_SAVE), {"IN_SAVE": f"kill:{SIGNAL_AFTER + 1}:0"})
    signal_at(w, procs, signal.SIGTERM)
    ((rc, text),) = finish(procs)
    assert rc == -signal.SIGKILL and "IN_SAVE kill at step" in text, text[-3000:]
    half = list((w / "checkpoints").glob("*.orbax-checkpoint-tmp*"))
    assert half and sorted(p.name for p in (w / "checkpoints").iterdir() if p.name.isdigit()) == ["3"]
    assert len(rows(w)) > 3
    ((_, text),) = run(w, command(w, data, "plain"))
    assert "ignoring half-written checkpoint" in text and f"at step 3" in text
    check_once(w, rows(ref))
    check_same_params(ref, w)


@pytest.mark.slow
def test_unreadable_newest_checkpoint_falls_back(tmp_path_factory, data):
    """The newest checkpoint's files damaged: the run warns naming it, moves it aside, resumes
    from the one before and reaches the uninterrupted run's values."""
    ref = reference(tmp_path_factory, data, "plain")
    w = tmp_path_factory.mktemp("w")
    shutil.copytree(ref / "checkpoints", w / "checkpoints")
    shutil.copy(ref / "metrics.jsonl", w / "metrics.jsonl")
    shutil.copytree(ref / "tensorboard", w / "tensorboard")
    assert sorted(p.name for p in (w / "checkpoints").iterdir()) == ["6", "8"]
    for f in (w / "checkpoints" / "8" / "state").rglob("*"):
        if f.is_file():
            f.write_bytes(b"damaged")
    time.sleep(1.1)                                    # a new event file name (whole seconds)
    ((_, text),) = run(w, command(w, data, "plain"))
    assert f"checkpoint {w / 'checkpoints' / '8'} is unreadable" in text, text[-3000:]
    assert f"resumed from {w / 'checkpoints' / '6'} at step 6" in text
    assert (w / "checkpoints" / "8.unreadable").is_dir() and (w / "checkpoints" / "8").is_dir()
    check_once(w, rows(ref))
    check_same_params(ref, w)


# ----------------------------------------------------------------------------- two processes

@pytest.mark.slow
@pytest.mark.parametrize("variant", ["plain", "packing+lora"])
def test_two_processes_stop_at_one_step(tmp_path_factory, data, variant):
    """SIGUSR1 to process 1 only: both processes stop after the same step (JAX's preemption
    sync), both exit 0, one checkpoint; the resumed 2-process run is bit-identical to an
    uninterrupted 2-process run."""
    ref = reference(tmp_path_factory, data, variant, processes=2)
    w = tmp_path_factory.mktemp("w")
    cmds = command(w, data, variant, 2)
    procs = start(w, cmds)
    t0 = signal_at(w, procs, signal.SIGUSR1, to=(1,))
    out = finish(procs)
    print(f"SIGUSR1 to process 1: exit of both after {time.time() - t0:.1f} s")
    assert [rc for rc, _ in out] == [0, 0], out[0][1][-3000:] + out[1][1][-3000:]
    steps = {stopped_step(out[0][1], "preemption notice"), stopped_step(out[1][1], "SIGUSR1")}
    (step,) = steps
    assert SIGNAL_AFTER < step < STEPS and [r["step"] for r in rows(w)] == list(range(1, step + 1))
    # the resumed run gets SIGUSR1 while it restores: both processes stop after its first step
    procs = start(w, command(w, data, variant, 2))
    wait_for(procs, 1, f"resumed from {w / 'checkpoints' / str(step)} at step {step}")
    procs[1][0].send_signal(signal.SIGUSR1)
    out = finish(procs)
    assert [rc for rc, _ in out] == [0, 0], out[0][1][-3000:] + out[1][1][-3000:]
    assert {stopped_step(out[0][1], "preemption notice", 2), stopped_step(out[1][1], "SIGUSR1", 2)} == {step + 1}
    out = run(w, command(w, data, variant, 2))
    assert all(f"at step {step + 1}" in text for _, text in out)
    check_once(w, rows(ref))
    check_same_params(ref, w)


@pytest.mark.slow
def test_hung_peer_inside_the_checkpoint_write(tmp_path_factory, data):
    """Process 1 hangs (alive, heartbeats flowing) inside the preemption checkpoint's write,
    before writing its part: process 0 exits non-zero within --step_timeout (its watchdog, or the
    failed collective once process 1's own watchdog ends it); it never says the checkpoint is
    written."""
    w = tmp_path_factory.mktemp("w")
    procs = start(w, command(w, data, "plain", 2, "--step_timeout=30", "--heartbeat_timeout=10",
                             "--config.export_final=False",
                             driver=IN_SAVE), {"IN_SAVE": f"hang:{SIGNAL_AFTER + 1}:1"})
    try:
        signal_at(w, procs, signal.SIGTERM, to=(0,))
        t0 = time.time()
        rc = procs[0][0].wait(timeout=200)
        elapsed = time.time() - t0
    finally:
        for p, _ in procs:
            if p.poll() is None:
                p.kill()
    text = procs[0][1].read_text()
    assert "IN_SAVE hang at step" in procs[1][1].read_text()
    assert rc != 0 and elapsed < 90, (rc, elapsed, text[-3000:])
    assert "FATAL (watchdog)" in text or "usually means another process died or hung" in text, text[-3000:]
    assert "train.py: stopped by" not in text
