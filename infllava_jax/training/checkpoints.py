"""Train checkpoints: Orbax CheckpointManager (async, keep N) of the train state and the data
counters, in `WORKDIR/checkpoints/<step>/{state,data/counts.json}`.

Nothing else is needed to resume: the data order is a function of the step (data/pipeline.py),
and the state restores onto whatever shardings the restore target carries, so a checkpoint
resumes on another mesh, device count or process count. The counters (good / truncated / bad
samples, summed over all processes) are written by process 0.

Only finalised checkpoints count: Orbax writes into a temporary directory and renames it when
complete, so a run killed mid-save leaves a temporary directory that is ignored (with a warning)
and the restart resumes from the latest complete step.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

log = logging.getLogger("infllava_jax")
COUNTS_FILE = "counts.json"

# Orbax writes a replicated array as one slice per replica, each slice cut by its own compiled XLA
# program (~8 ms to compile each, once per shape): on a data-parallel mesh the first save of even a
# tiny model took 8 s. Arrays under 4 MiB are written whole by one replica instead.
ocp.type_handlers.register_type_handler(jax.Array, ocp.type_handlers.ArrayHandler(
    min_slice_bytes_for_replica_parallel=4 << 20), override=True)


class TrainCheckpoints:
    def __init__(self, workdir: str | Path, keep: int = 3, async_save: bool = True):
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

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        """(the state on the shardings in `abstract_state` (ShapeDtypeStructs), the data counters)."""
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
        return out["state"], out["data"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
