"""Train checkpoints: Orbax CheckpointManager (async, keep N) of the train state and the data
counters, in `WORKDIR/checkpoints/<step>/{state,data/counts.json}`.

Nothing else is needed to resume: the data order is a function of the step (data/pipeline.py),
and the state restores onto whatever shardings the restore target carries, so a checkpoint
resumes on another mesh, device count or process count. The counters (good / truncated / bad
samples, summed over all processes) are written by process 0.

Only finalised checkpoints count: Orbax writes into a temporary directory and renames it when
complete, so a run killed mid-save (kill -9 included) leaves a temporary directory that is
ignored (with a warning) and the restart resumes from the latest complete step. A complete one
that does not restore (files lost or damaged later) is named in a warning and moved aside to
`<step>.unreadable`, and the one before it is restored (`restore_latest`).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

log = logging.getLogger("infllava_jax")
COUNTS_FILE = "counts.json"



def _register_array_handler() -> None:
    """Orbax writes a replicated array as one slice per replica, each slice cut by its own compiled
    XLA program (~8 ms to compile each, once per shape): on a data-parallel mesh the first save of
    even a tiny model took 8 s. Arrays under 4 MiB are written whole by one replica instead. Done
    when the first TrainCheckpoints is made (not at import), without Orbax's warning that the
    jax.Array handler is replaced: that replacement is this one, on purpose."""
    if getattr(_register_array_handler, "done", False):
        return
    quiet = _DropMessage("Type handler registry type")
    logging.getLogger("absl").addFilter(quiet)
    try:
        ocp.type_handlers.register_type_handler(jax.Array, ocp.type_handlers.ArrayHandler(
            min_slice_bytes_for_replica_parallel=4 << 20), override=True)
    finally:
        logging.getLogger("absl").removeFilter(quiet)
    _register_array_handler.done = True


class _DropMessage(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


class TrainCheckpoints:
    def __init__(self, workdir: str | Path, keep: int = 3, async_save: bool = True):
        _register_array_handler()
        self.dir = Path(workdir).absolute() / "checkpoints"
        for tmp in sorted(self.dir.glob("*.orbax-checkpoint-tmp*")) if self.dir.exists() else ():
            log.warning("ignoring half-written checkpoint %s (the run stopped while saving it)", tmp)
        self.manager = ocp.CheckpointManager(
            self.dir, item_names=("state", "data"),
            item_handlers={"state": ocp.StandardCheckpointHandler(),
                           "data": ocp.JsonCheckpointHandler(filename=COUNTS_FILE)},
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                                 enable_async_checkpointing=async_save))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_counts: dict) -> None:
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        data=ocp.args.JsonSave(data_counts)))

    def restore_latest(self, abstract_state: Any) -> tuple[int, Any, dict | None]:
        """(step, state, data counters) of the newest checkpoint that restores on every process;
        (0, None, None) without checkpoints. Unreadable newer ones are named in a warning and moved
        aside; when none restores, the newest one's error is raised (no silent start from 0)."""
        broken, error = [], None
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                state, counts = self.restore(step, abstract_state)
                ok = True
            except Exception as e:     # noqa: BLE001 - Orbax raises many kinds for damaged files
                ok, state, counts, error = False, None, None, error or e
                log.warning("checkpoint %s is unreadable (%s: %s); trying the one before", self.dir / str(step),
                            type(e).__name__, str(e).splitlines()[0][:300] if str(e) else "")
            if _all_processes(ok):
                self._set_aside(broken)
                return step, state, counts
            broken.append(step)
        if error is not None or broken:
            raise error or RuntimeError(f"no checkpoint in {self.dir} restores on every process")
        return 0, None, None

    def _set_aside(self, steps: list[int]) -> None:
        """Rename unreadable checkpoints to <step>.unreadable (kept for inspection; their step is
        written again when the run reaches it)."""
        if not steps:
            return
        if jax.process_index() == 0:
            for step in steps:
                os.replace(self.dir / str(step), self.dir / f"{step}.unreadable")
                log.warning("moved unreadable checkpoint %s aside to %s", self.dir / str(step),
                            self.dir / f"{step}.unreadable")
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices("unreadable checkpoints moved aside")
        self.manager.reload()

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        """(the state on the shardings in `abstract_state` (ShapeDtypeStructs), the data counters)."""
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
        return out["state"], out["data"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def _all_processes(ok: bool) -> bool:
    """True when `ok` on every process (one tiny all-gather; a no-op with one process)."""
    if jax.process_count() == 1:
        return ok
    import numpy as np
    from jax.experimental import multihost_utils
    return bool(np.asarray(multihost_utils.process_allgather(np.int32(ok))).all())
