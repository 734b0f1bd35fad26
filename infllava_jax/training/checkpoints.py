"""Train checkpoints: Orbax CheckpointManager (async, keep N) of the train state and the grain
iterator state, in `WORKDIR/checkpoints/<step>/{state,data}`.

Only finalised checkpoints count: Orbax writes into a temporary directory and renames it when
complete, so a run killed mid-save leaves a temporary directory that is ignored (with a warning)
and the restart resumes from the latest complete step.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp


log = logging.getLogger("infllava_jax")


class TrainCheckpoints:
    def __init__(self, workdir: str | Path, keep: int = 3, async_save: bool = True):
        self.dir = Path(workdir).absolute() / "checkpoints"
        for tmp in sorted(self.dir.glob("*.orbax-checkpoint-tmp*")) if self.dir.exists() else ():
            log.warning("ignoring half-written checkpoint %s (the run stopped while saving it)", tmp)
        self.manager = ocp.CheckpointManager(
            self.dir, item_names=("state", "data"),
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                                 enable_async_checkpointing=async_save))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_iterator) -> None:
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(data_iterator)))

    def restore(self, step: int, abstract_state: Any, data_iterator) -> Any:
        """Restores the state onto the shardings in `abstract_state` (ShapeDtypeStructs) and the
        iterator in place; returns the state."""
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=grain.checkpoint.CheckpointRestore(data_iterator)))
        return out["state"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs (with shardings) of a tree of arrays: the restore target."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
