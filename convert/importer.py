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
from convert.nonfinite import FiniteCheck
from infllava_jax.errors import one_line
from infllava_jax.api import InfLlava
from infllava_jax.params import abstract_params, param_shardings
from infllava_jax.checkpoint import save_checkpoint


def progress_bar(total: int, desc: str, enabled: bool = True) -> tqdm:
    """A bar over bytes (MB/s); shows nothing unless enabled."""
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1000, file=sys.stderr,
                dynamic_ncols=True, mininterval=0.5, disable=not enabled)


def plan(source: Source, allow_nonfinite: bool = False) -> dict[str, engine.Leaf]:
    """Check everything (keys, shapes, coverage) before any tensor is read; every leaf then
    checks what it reads for NaN / Inf (nonfinite.py)."""
    try:
        abstract = abstract_params(source.config)
    except (ValueError, TypeError) as e:   # a config.json whose fields do not make a model
        raise ConversionError(f"{source.path or source.kind}: its config does not describe a buildable model "
                              f"({one_line(e)})") from None
    leaves = engine.import_plan(source.rows, source.tensors, abstract, ignore=source.ignore,
                                what=f"{source.kind} checkpoint")
    check = FiniteCheck(allow_nonfinite)
    for leaf in leaves.values():
        leaf.check = check
    return leaves


def finite_check(leaves: dict[str, engine.Leaf]) -> FiniteCheck:
    """The FiniteCheck that `plan` gave every leaf."""
    return next(iter(leaves.values())).check if leaves else FiniteCheck()


def convert(src, dst, *, vision_tower=None, llm=None, dtype: str = "auto", add_pad_token: bool = True,
            seed: int = 0, overwrite: bool = False, progress: bool = True, allow_nonfinite: bool = False,
            log=print) -> tuple[Source, dict]:
    """Convert SRC (+ --vision-tower/--llm) into our checkpoint at DST, streaming: each
    parameter is read from the source files and written piece by piece; DST appears
    atomically when complete (not at all after an error). NaN / Inf in a tensor: an error
    naming it, or with allow_nonfinite a warning on stderr. Returns (source, stats)."""
    dst = Path(dst)
    if dst.exists() and not overwrite:
        raise ConversionError(f"{dst} exists (pass --overwrite to replace it)")
    source = formats.resolve(src, vision_tower=vision_tower, llm=llm, dtype=dtype,
                             add_pad_token=add_pad_token, seed=seed)
    leaves = plan(source, allow_nonfinite)
    total = sum(leaf.nbytes for leaf in leaves.values())
    c = source.config
    log(f"{src}: {source.kind}; {len(leaves)} parameters, {total / 1e9:.2f} GB "
        f"(vision {c.vision.param_dtype}, llm {c.llm.param_dtype}" + (f", dem {c.dem.param_dtype})" if c.dem else ")"))
    for note in source.notes:
        log(f"  {note}")
    t0 = time.perf_counter()
    with progress_bar(total, "convert", progress) as bar:
        save_checkpoint(dst, c, unflatten_dict(leaves, sep="/"), progress=bar.update,
                        before_commit=finite_check(leaves).raise_if_found)
    dt = time.perf_counter() - t0
    for line in finite_check(leaves).warnings():
        print(line, file=sys.stderr)
    stats = {"bytes": total, "seconds": dt, "mb_per_s": total / 1e6 / max(dt, 1e-9)}
    log(f"wrote {dst} in {dt:.1f} s ({stats['mb_per_s']:.0f} MB/s)")
    return source, stats


def load(src, *, vision_tower=None, llm=None, dtype: str = "auto", add_pad_token: bool = True, seed: int = 0,
         mesh=None) -> InfLlava:
    """SRC as an InfLlava in memory, each parameter created shard by shard on `mesh` (one
    device if None) from only the slice of the source each shard needs."""
    source = formats.resolve(src, vision_tower=vision_tower, llm=llm, dtype=dtype,
                             add_pad_token=add_pad_token, seed=seed)
    leaves = plan(source)
    params = engine.to_jax(leaves, param_shardings(source.config, mesh))
    finite_check(leaves).raise_if_found()
    return InfLlava(source.config, params)
