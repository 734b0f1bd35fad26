"""Train checkpoints: Orbax CheckpointManager (async, keep N) of the train state and the grain
iterator state, in `WORKDIR/checkpoints/<step>/{state,data}`.

Elastic: the state restores onto whatever shardings the restore target carries (another mesh,
device or process count). The data iterator state is one JSON file per process
(`data/process_<p>-of-<P>.json`, grain's format); a run with the same layout (process count and
per-process batch) resumes exactly from its own file, otherwise every process reads all the old
files and `LlavaBatchIterator.resume_elastic` recomputes its position in the global stream.

Only finalised checkpoints count: Orbax writes into a temporary directory and renames it when
complete, so a run killed mid-save leaves a temporary directory that is ignored (with a warning)
and the restart resumes from the latest complete step.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import re
from pathlib import Path
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp


log = logging.getLogger("infllava_jax")

# Orbax writes a replicated array as one slice per replica, each slice cut by its own compiled XLA
# program (~8 ms to compile each, once per shape): on a data-parallel mesh the first save of even a
# tiny model took 8 s. Arrays under 4 MiB are written whole by one replica instead. (No array
# metadata store: it only records PRNG-key dtypes, and a train state holds no keys.)
ocp.type_handlers.register_type_handler(jax.Array, ocp.type_handlers.ArrayHandler(
    min_slice_bytes_for_replica_parallel=4 << 20), override=True)


class ElasticDataHandler(grain.checkpoint.CheckpointHandler):
    """grain's iterator checkpoint (same files), restorable onto another process layout."""

    def restore(self, directory, item=None, args=None):
        item = item if item is not None else args.item
        p, P = jax.process_index(), jax.process_count()
        own = directory / f"process_{p}-of-{P}.json"
        state = json.loads(own.read_text()) if own.exists() else None
        elastic = hasattr(item, "resume_elastic")
        if state is not None and (not elastic or item.same_layout(state)):
            item.set_state(state)
        elif elastic:
            files = sorted(directory.glob("process_*-of-*.json"))
            counts = {int(re.fullmatch(r"process_\d+-of-(\d+)\.json", f.name).group(1)) for f in files}
            if len(counts) != 1 or len(files) != counts.copy().pop():
                raise ValueError(f"{directory}: incomplete data iterator checkpoint {[f.name for f in files]}")
            item.resume_elastic([json.loads(f.read_text()) for f in files])
        else:
            raise ValueError(f"{own} does not exist: the checkpoint was saved by another number of "
                             f"processes and this iterator ({type(item).__name__}) cannot resume elastically")
        item.start_prefetch()
        return item


@ocp.args.register_with_handler(ElasticDataHandler, for_save=True)
@dataclasses.dataclass
class DataSave(ocp.args.CheckpointArgs):
    item: Any


@ocp.args.register_with_handler(ElasticDataHandler, for_restore=True)
@dataclasses.dataclass
class DataRestore(ocp.args.CheckpointArgs):
    item: Any


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
            state=ocp.args.StandardSave(state), data=DataSave(data_iterator)))

    def restore(self, step: int, abstract_state: Any, data_iterator) -> Any:
        """Restores the state onto the shardings in `abstract_state` (ShapeDtypeStructs) and the
        iterator in place; returns the state."""
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=DataRestore(data_iterator)))
        return out["state"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs (with shardings) of a tree of arrays: the restore target."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
