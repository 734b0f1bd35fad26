"""Answer a JSONL file of chat requests offline, batched, resumable (docs/serving.md).

    python -m infllava_jax.predict --ckpt DIR --input requests.jsonl --output answers.jsonl [--quant int8|int4]

Each input line is a `POST /v1/chat/completions` body with an `id` (string or number); each
output line is {"id", "text", "finish_reason", "usage"}. Lines are decoded in batches of
--batch-size through the server's engine (same prompts, buckets and programs); each batch's
answers are appended and flushed before the next starts, so a killed run loses at most the batch
in flight, and a rerun skips the ids already in --output. Bad lines (not JSON, bad fields, a
broken image, too long, a repeated id) are skipped, counted and listed with their line numbers.
Image paths are read from inside --image-dir (default: the input file's directory).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from infllava_jax.serve import add_model_args


def read_done(path: Path) -> set[str]:
    """Ids already answered in `path`; a last line cut short by a kill is removed."""
    if not path.is_file():
        return set()
    raw = path.read_bytes()
    if raw and not raw.endswith(b"\n"):
        raw = raw[:raw.rfind(b"\n") + 1]
        path.write_bytes(raw)
    done = set()
    for n, line in enumerate(raw.decode("utf-8", "replace").splitlines(), 1):
        try:
            done.add(_key(json.loads(line)["id"]))
        except (json.JSONDecodeError, KeyError, TypeError):
            from infllava_jax.errors import InputError
            raise InputError(f"{path}:{n}: not an answer line of this tool (expected a JSON object with 'id'); "
                             f"pass another --output") from None
    return done


def _key(x) -> str:
    from infllava_jax.evaluation.datasets import id_key
    return id_key(x)


def read_requests(path: Path, done: set[str], bad: list) -> tuple[list, int]:
    """[(line number, BatchLine)] still to answer, and how many were answered before."""
    from infllava_jax.serving.schema import APIError, BatchLine, parse
    todo, seen, skipped = [], {}, 0
    with open(path, "rb") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                req = parse(line, BatchLine)
            except APIError as e:
                bad.append((n, e.message))
                continue
            k = _key(req.id)
            if k in seen:
                bad.append((n, f"repeated id {k!r} (first on line {seen[k]})"))
                continue
            seen[k] = n
            if k in done:
                skipped += 1
            else:
                todo.append((n, req))
    return todo, skipped


def answer_batch(engine, lines, load, bad: list) -> list[dict]:
    """Answers of a batch of (line number, request), in order; bad ones appended to `bad`.
    `load(url, param)` reads an image (serving/images.py with this run's limits)."""
    import secrets
    from infllava_jax.evaluation.runner import Sampling
    from infllava_jax.serving.prompt import prepare
    from infllava_jax.serving.schema import APIError
    from infllava_jax.serving.text import TextStream
    jobs = []
    for n, req in lines:
        try:
            stops = req.stop_strings()
            prepared = prepare(engine.model, req.messages, load, engine.max_images)
            seed = secrets.randbits(31) if req.seed is None else req.seed
            job = engine.make_job(prepared, req.token_limit(), Sampling(req.temperature, req.top_p, seed))
            jobs.append((req, stops, job))
        except APIError as e:
            bad.append((n, e.message))
    groups: dict = {}
    for item in jobs:
        groups.setdefault(item[2].key, []).append(item)
    out = {}
    for key, items in groups.items():
        size = 1 if key[1] else engine.max_batch
        for i in range(0, len(items), size):
            part = items[i:i + size]
            for (req, stops, job), r in zip(part, engine.decode([j for _, _, j in part])):
                text, by_stop = TextStream.full(engine.model.tokenizer, stops, r.tokens)
                out[id(req)] = {"id": req.id, "text": text, "finish_reason": "stop" if by_stop else r.finish_reason,
                                "usage": {"prompt_tokens": r.prompt_tokens, "completion_tokens": len(r.tokens)}}
    return [out[id(req)] for req, _, _ in jobs]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m infllava_jax.predict", description=__doc__.split("\n")[0])
    add_model_args(p)
    p.add_argument("--input", type=Path, required=True, help="JSONL: one chat request with an 'id' per line")
    p.add_argument("--output", type=Path, required=True, help="JSONL answers, appended (a rerun resumes)")
    p.add_argument("--batch-size", type=int, default=8)
    a = p.parse_args(argv)
    from infllava_jax.errors import InputError, one_line
    try:
        if not a.input.is_file():
            raise InputError(f"--input {a.input}: no such file")
        if a.batch_size < 1:
            raise InputError(f"--batch-size {a.batch_size}: expected >= 1")
        bad: list = []
        todo, skipped = read_requests(a.input, read_done(a.output), bad)
        answered = _run(a, todo, bad) if todo else 0
    except InputError as e:
        print(f"predict: error: {one_line(e, 1000)}", file=sys.stderr)
        return 2
    print(f"predict: {answered} answered, {skipped} already in {a.output}, {len(bad)} bad line(s) skipped",
          file=sys.stderr)
    for n, msg in sorted(bad):
        print(f"  {a.input}:{n}: {msg}", file=sys.stderr)
    return 0


def _run(a, todo, bad) -> int:
    from functools import partial
    from tqdm import tqdm
    from infllava_jax.serve import load_engine
    from infllava_jax.serving import images
    engine = load_engine(a, batch_sizes=(a.batch_size,))
    load = partial(images.load_image_url, image_dir=a.image_dir or a.input.resolve().parent,
                   max_bytes=a.max_image_bytes, max_pixels=a.max_image_pixels)
    a.output.parent.mkdir(parents=True, exist_ok=True)
    answered = 0
    with open(a.output, "a", encoding="utf-8") as out, tqdm(total=len(todo), unit="req", desc="predict") as bar:
        for i in range(0, len(todo), a.batch_size):
            rows = answer_batch(engine, todo[i:i + a.batch_size], load, bad)
            out.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
            out.flush()
            os.fsync(out.fileno())
            answered += len(rows)
            bar.update(len(todo[i:i + a.batch_size]))
    return answered


if __name__ == "__main__":
    sys.exit(main())
