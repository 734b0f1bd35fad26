"""Fuzz helpers: broken variants of good files (fixed seeds, numpy only) and the rule each run obeys.

The rule (issue 16): a CLI refuses with one line (`error: ...` or `<prog>: ...`) and a non-zero
exit, never a traceback; nothing is left at the destination; every run ends within a bound.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import signal
import time
from pathlib import Path

import numpy as np

TIME_LIMIT_S = 20
WRONG_VALUES = (None, "x", -1, 0, 10 ** 6, 1.5, [], {}, True)


class Hang(Exception):
    pass


@contextlib.contextmanager
def bounded(seconds: float = TIME_LIMIT_S):
    """Raise Hang in the main thread after `seconds` (a hang fails the test instead of blocking it)."""
    def on_alarm(*_):
        raise Hang(f"still running after {seconds} s")
    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def run_cli(main, argv) -> tuple[int | None, str, BaseException | None, float]:
    """main(argv) in-process: (exit code, stderr, escaped exception or None, seconds)."""
    err, out = io.StringIO(), io.StringIO()
    t, code, exc = time.perf_counter(), None, None
    logged = logging.StreamHandler(err)   # what libraries log (e.g. tracebacks from writer threads) counts too
    logging.getLogger().addHandler(logged)
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            with bounded():
                code = main([str(a) for a in argv])
        except SystemExit as e:   # argparse usage errors: fine, they are one-line refusals
            code = e.code if isinstance(e.code, int) else 2
        except BaseException as e:   # noqa: BLE001 - what the rule forbids
            exc = e
        finally:
            logging.getLogger().removeHandler(logged)
    return code, err.getvalue(), exc, time.perf_counter() - t


def rule_violation(code, err: str, exc, dst: Path | None = None, prefix: str = "error:") -> str | None:
    """None if the run obeyed the rule, else what it did wrong."""
    if exc is not None:
        return f"escaped {type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
    if "Traceback" in err:
        return "traceback on stderr"
    if code not in (0, None):
        lines = [ln for ln in err.splitlines() if ln.strip()]
        if not lines or not lines[-1].startswith(prefix):
            return f"exit {code} without a one-line {prefix!r} message: {err[-200:]!r}"
        if dst is not None and dst.exists():
            return f"exit {code} but {dst} exists"
    if dst is not None and dst.parent.is_dir() and any(p.name.startswith(f".{dst.name}.tmp") for p in dst.parent.iterdir()):
        return "a temporary directory was left next to the destination"
    return None


# ----------------------------------------------------------------------------- byte mutations

def truncate(data: bytes, rng) -> bytes:
    return data[:int(rng.integers(0, len(data)))]


def flip(data: bytes, rng, start: int = 0, stop: int | None = None, n: int = 3) -> bytes:
    b = bytearray(data)
    stop = len(b) if stop is None else min(stop, len(b))
    for i in rng.integers(start, max(start + 1, stop), n):
        b[int(i)] ^= int(rng.integers(1, 256))
    return bytes(b)


def mutate_bytes(data: bytes, rng) -> tuple[str, bytes]:
    kind = ("truncate", "flip", "zero", "garbage")[int(rng.integers(4))]
    if kind == "truncate":
        return kind, truncate(data, rng)
    if kind == "flip":
        return kind, flip(data, rng, n=int(rng.integers(1, 8)))
    if kind == "zero":
        return kind, b""
    return kind, rng.integers(0, 256, int(rng.integers(1, 200)), dtype=np.uint8).tobytes()


# ----------------------------------------------------------------------------- JSON mutations

def paths(obj, prefix=()):
    """Every (path) to a value inside nested dicts/lists."""
    out = []
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for k, v in items:
        out.append(prefix + (k,))
        out += paths(v, prefix + (k,))
    return out


def _parent(obj, path):
    for k in path[:-1]:
        obj = obj[k]
    return obj


def mutate_json(obj, rng):
    """(description, a deep copy of obj with one field dropped, duplicated or given a wrong type)."""
    obj = json.loads(json.dumps(obj))
    ps = paths(obj)
    if not ps:
        return "replace the whole value", WRONG_VALUES[int(rng.integers(len(WRONG_VALUES)))]
    p = ps[int(rng.integers(len(ps)))]
    parent, kind = _parent(obj, p), ("drop", "wrong type", "duplicate")[int(rng.integers(3))]
    if kind == "drop":
        del parent[p[-1]]
    elif kind == "wrong type":
        parent[p[-1]] = WRONG_VALUES[int(rng.integers(len(WRONG_VALUES)))]
    elif isinstance(parent, list):
        parent.insert(p[-1], json.loads(json.dumps(parent[p[-1]])))
    else:
        parent[f"{p[-1]}_copy"] = parent[p[-1]]
    return f"{kind} {'/'.join(map(str, p))}", obj
