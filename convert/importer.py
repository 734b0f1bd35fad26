"""PyTorch checkpoint -> our checkpoint (streamed to disk) or -> an InfLlava in memory (sharded)."""
from __future__ import annotations

import sys
import time
from pathlib import Path

from flax.traverse_util import unflatten_dict
from tqdm import tqdm

from convert import engine, formats
from convert.errors import ConversionError
from convert.formats import Source
from infllava_jax.api import InfLlava, abstract_params, param_shardings
from infllava_jax.checkpoint import save_checkpoint


def progress_bar(total: int, desc: str, enabled: bool = True) -> tqdm:
    """A bar over bytes (MB/s); shows nothing unless enabled."""
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1000, file=sys.stderr,
                dynamic_ncols=True, mininterval=0.5, disable=not enabled)


def plan(source: Source) -> dict[str, engine.Leaf]:
    """Check everything (keys, shapes, coverage) before any tensor is read."""
    return engine.import_plan(source.rows, source.tensors, abstract_params(source.config),
                              ignore=source.ignore, what=f"{source.kind} checkpoint")


def convert(src, dst, *, vision_tower=None, llm=None, dtype: str = "auto", add_pad_token: bool = True,
            seed: int = 0, overwrite: bool = False, progress: bool = True, log=print) -> tuple[Source, dict]:
    """Convert SRC (+ --vision-tower/--llm) into our checkpoint at DST, streaming: each
    parameter is read from the source files and written piece by piece; DST appears
    atomically when complete. Returns (source, stats)."""
    dst = Path(dst)
    if dst.exists() and not overwrite:
        raise ConversionError(f"{dst} exists (pass --overwrite to replace it)")
    source = formats.resolve(src, vision_tower=vision_tower, llm=llm, dtype=dtype,
                             add_pad_token=add_pad_token, seed=seed)
    leaves = plan(source)
    total = sum(leaf.nbytes for leaf in leaves.values())
    c = source.config
    log(f"{src}: {source.kind}; {len(leaves)} parameters, {total / 1e9:.2f} GB "
        f"(vision {c.vision.param_dtype}, llm {c.llm.param_dtype}" + (f", dem {c.dem.param_dtype})" if c.dem else ")"))
    for note in source.notes:
        log(f"  {note}")
    t0 = time.perf_counter()
    with progress_bar(total, "convert", progress) as bar:
        save_checkpoint(dst, c, unflatten_dict(leaves, sep="/"), progress=bar.update)
    dt = time.perf_counter() - t0
    stats = {"bytes": total, "seconds": dt, "mb_per_s": total / 1e6 / max(dt, 1e-9)}
    log(f"wrote {dst} in {dt:.1f} s ({stats['mb_per_s']:.0f} MB/s)")
    return source, stats


def load(src, *, vision_tower=None, llm=None, dtype: str = "auto", add_pad_token: bool = True, seed: int = 0,
         mesh=None) -> InfLlava:
    """SRC as an InfLlava in memory, each parameter created shard by shard on `mesh` (one
    device if None) from only the slice of the source each shard needs."""
    source = formats.resolve(src, vision_tower=vision_tower, llm=llm, dtype=dtype,
                             add_pad_token=add_pad_token, seed=seed)
    return InfLlava(source.config, engine.to_jax(plan(source), param_shardings(source.config, mesh)))
