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
from infllava_jax import conversation
from infllava_jax.errors import InputError, one_line
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


def tokenizer_dirs(src, llm=None, tokenizer=None) -> list[Path]:
    """Where a conversion looks for tokenizer files, in order: --tokenizer, SRC (a directory
    that is not a CLIP one: CLIP has a tokenizer of its own), --llm."""
    out = [Path(tokenizer)] if tokenizer else []
    for d in (src, llm):
        if d is not None and Path(d).is_dir() and _model_type(Path(d)) not in ("clip", "clip_vision_model"):
            out.append(Path(d))
    return out


def _model_type(directory: Path):
    try:
        return formats.read_config(directory).get("model_type")
    except ConversionError:
        return None


def decide_usage(source: Source, dirs: list[Path], template: str | None, log=print):
    """(Usage, tokenizer directory or None) for DST's usage.json (conversation.py): the template
    from --template, else the tokenizer's, else the family's; stop ids from the tokenizer and
    generation_config.json."""
    tok_dir = conversation.find_tokenizer_dir(dirs)
    try:
        tok = None if tok_dir is None else conversation.load_tokenizer(str(tok_dir), template=template)
        usage = conversation.family_usage(source.config.dem is not None, tok, template)
        stops = (conversation.stop_ids(usage, tok) if tok is not None else ()) + conversation.generation_eos_ids(tok_dir)
    except InputError as e:
        raise ConversionError(one_line(e, 1000)) from None
    usage = usage.override(stop_ids=tuple(dict.fromkeys(stops)))
    if tok_dir is None:
        log(f"no tokenizer files (tokenizer.json / tokenizer.model) in {', '.join(map(str, dirs)) or 'the source'}: "
            f"the checkpoint has none; pass --tokenizer DIR here, or to the chat / eval.py later")
    else:
        log(f"tokenizer from {tok_dir}; template {usage.template}, stop ids {list(usage.stop_ids)}")
    return usage, tok_dir


def convert(src, dst, *, vision_tower=None, llm=None, dtype: str = "auto", add_pad_token: bool = True,
            seed: int = 0, overwrite: bool = False, progress: bool = True, allow_nonfinite: bool = False,
            tokenizer=None, template: str | None = None, log=print) -> tuple[Source, dict]:
    """Convert SRC (+ --vision-tower/--llm) into our checkpoint at DST, streaming: each
    parameter is read from the source files and written piece by piece; DST appears
    atomically when complete (not at all after an error). NaN / Inf in a tensor: an error
    naming it, or with allow_nonfinite a warning on stderr. DST also gets usage.json and the
    tokenizer files (decide_usage). Returns (source, stats)."""
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
    usage, tok_dir = decide_usage(source, tokenizer_dirs(src, llm, tokenizer), template, log)
    t0 = time.perf_counter()
    with progress_bar(total, "convert", progress) as bar:
        save_checkpoint(dst, c, unflatten_dict(leaves, sep="/"), progress=bar.update,
                        before_commit=finite_check(leaves).raise_if_found,
                        extra_files=lambda d: conversation.write_usage(d, usage, tok_dir))
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
