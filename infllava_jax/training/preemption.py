"""Preemption and interruption (docs/preemption.md): SIGTERM, the run's second signal
(`config.preemption_signal`, SIGUSR1 by default) and Ctrl-C stop every process of the job at the
same step boundary; the loop (training/loop.py) writes a checkpoint there, prints one line and
ends with exit code 0 (130 after Ctrl-C). A second Ctrl-C ends the process at once.

Where the processes agree on the step:
  * one process: the signal handler sets a flag; the step that is running when it arrives is the
    last one.
  * several processes: JAX's preemption sync (`multihost_utils.reached_preemption_sync_point`,
    called after every step): a SIGTERM caught by JAX's notifier (installed by
    `jax.distributed.initialize`) on any one process reaches all of them through the coordination
    service, which picks the step after the furthest one any process has reached. The second
    signal and Ctrl-C are turned into that SIGTERM (the process sends it to itself). It costs no
    collective per step: `reached_preemption_sync_point` reads a counter.
"""
from __future__ import annotations

import logging
import os
import signal
import sys
import threading

import jax

from infllava_jax.errors import InputError

log = logging.getLogger("infllava_jax")
EXIT_INTERRUPTED = 130          # 128 + SIGINT, as a shell reports a Ctrl-C


def signal_number(name: str) -> signal.Signals | None:
    """'SIGUSR1' / 'USR1' / '' -> the signal (None for ''); InputError naming what is accepted
    (train.py: one line, exit 2)."""
    if not name:
        return None
    full = name.upper() if name.upper().startswith("SIG") else "SIG" + name.upper()
    sig = getattr(signal.Signals, full, None) if full.isidentifier() else None
    if sig is None or sig in (signal.SIGKILL, signal.SIGSTOP):
        raise InputError(f"config.preemption_signal={name!r} is not a signal a process can catch; expected "
                         f"e.g. SIGUSR1, SIGUSR2 or '' (SIGTERM and Ctrl-C only)")
    return sig


class Preemption:
    """Installs the handlers (main thread only; `uninstall()` puts the previous ones back);
    `reached(step)` is True at the step where every process stops."""

    def __init__(self, extra_signal: str = "SIGUSR1"):
        self.received: str | None = None          # the first signal this process received
        self.multi = jax.process_count() > 1
        sigs = {signal.SIGINT} | ({signal.SIGTERM} if not self.multi else set())
        extra = signal_number(extra_signal)
        if extra is not None:
            sigs.add(extra)
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            for s in sigs:
                self._previous[s] = signal.signal(s, self._handle)

    def _handle(self, signum, _frame) -> None:
        name = signal.Signals(signum).name
        if self.received is not None and signum == signal.SIGINT:
            sys.stderr.write("\nsecond Ctrl-C: stopping now, without a checkpoint (the same command resumes "
                             "from the last complete one)\n")
            sys.stderr.flush()
            os._exit(EXIT_INTERRUPTED)
        if self.received is None:
            self.received = name
            sys.stderr.write(f"\n{name}: stopping at the end of this step to write a checkpoint "
                             f"({'Ctrl-C again to stop at once' if signum == signal.SIGINT else 'then exiting'})\n")
            sys.stderr.flush()
        if self.multi and signum != signal.SIGTERM:
            os.kill(os.getpid(), signal.SIGTERM)  # JAX's notifier tells the other processes

    def reached(self, steps_done: int) -> bool:
        """Call after every step, on every process, with the number of steps this run has taken
        (1, 2, ...: not the global step: JAX's sync starts its count at 0, so after a resume from
        step k a notice that came before the first call would otherwise wait for step 1 forever)."""
        if self.multi:
            from jax.experimental import multihost_utils
            return multihost_utils.reached_preemption_sync_point(steps_done)
        return self.received is not None

    @property
    def exit_code(self) -> int:
        return EXIT_INTERRUPTED if self.received == "SIGINT" else 0

    def uninstall(self) -> None:
        for s, previous in self._previous.items():
            signal.signal(s, previous)
        self._previous = {}

    def leave(self, step: int, checkpoint) -> None:
        """After the checkpoint of `step` is complete: the one line, then exit 130 after Ctrl-C
        (0: return, and train.py ends normally)."""
        self.uninstall()
        why = self.received or "a preemption notice (SIGTERM to one of the job's processes)"
        print(f"train.py: stopped by {why} at step {step}; checkpoint {checkpoint} written; "
              "run the same command to resume from it", file=sys.stderr, flush=True)
        if self.exit_code == 0:
            return                                # train.py disarms the deadlines and ends with 0
        if not self.multi:
            raise SystemExit(self.exit_code)
        jax.distributed.shutdown()                # the others leave normally: meet them (watchdog armed)
        for h in logging.getLogger().handlers + log.handlers:
            h.flush()
        sys.stdout.flush()
        os._exit(self.exit_code)
