"""Local benchmark files: lmms-lab parquet shards or jsonl rows with the same fields; images as
embedded bytes (HF `Image` structs {"bytes", "path"}), base64 strings or file paths. Nothing is
downloaded. Also the prediction files (jsonl `{"question_id": ..., "text": ...}`).

Rows are plain dicts. Image columns are left as stored (bytes, never decoded here) until
`open_image` is called, so scoring never touches pixels, and parquet readers can skip the image
columns entirely (`columns=`).
"""
from __future__ import annotations

import base64
import binascii
import io
import json
import os
from pathlib import Path
from typing import Iterable, Sequence

from PIL import Image

from infllava_jax.data.images import open_capped, to_rgb
from infllava_jax.errors import InputError, one_line

DATA_SUFFIXES = (".parquet", ".jsonl", ".json")


class DataError(InputError):
    """A data or prediction file that cannot be used; the message names the file (and line)."""


# ----------------------------------------------------------------------------- locating files

def resolve_files(path: str | os.PathLike, globs: Sequence[str] = ()) -> list[Path]:
    """A data file, or the data files of a directory: the first of `globs` that matches
    (e.g. "ScienceQA-IMG/test-*.parquet"), else every parquet file, else every jsonl/json file."""
    p = Path(path)
    if p.is_file():
        return [p]
    if not p.is_dir():
        raise DataError(f"{p}: no such file or directory")
    for g in tuple(globs) + ("**/*.parquet", "**/*.jsonl", "**/*.json"):
        found = sorted(f for f in p.glob(g) if f.is_file() and f.suffix in DATA_SUFFIXES)
        if found:
            return found
    raise DataError(f"{p}: no .parquet / .jsonl / .json data files")


def find_task_data(root: str | os.PathLike, names: Sequence[str], globs: Sequence[str] = ()) -> list[Path]:
    """Data of one task: ROOT itself if a file; else ROOT/<name>.{jsonl,parquet,json} or
    ROOT/<name>/... for the first of `names` present; else ROOT as the task's own directory."""
    root = Path(root)
    if root.is_file():
        return [root]
    for n in names:
        for suf in DATA_SUFFIXES:
            if (root / f"{n}{suf}").is_file():
                return [root / f"{n}{suf}"]
        if (root / n).is_dir():
            return resolve_files(root / n, globs)
    if root.is_dir():  # the task's own directory
        try:
            return resolve_files(root, globs)
        except DataError:
            pass
    raise DataError(f"{root}: no data for this task; looked for {', '.join(names)} "
                    f"(+ .jsonl/.parquet/.json or a directory)")


# ----------------------------------------------------------------------------- reading rows

def _read_parquet(f: Path, columns=None, skip_columns=()) -> list[dict]:
    import pyarrow.parquet as pq
    try:
        pf = pq.ParquetFile(f)
        names = pf.schema_arrow.names
        cols = [c for c in (columns or names) if c in names and c not in skip_columns]
        return pf.read(columns=cols).to_pylist()
    except Exception as e:  # pyarrow raises several types
        raise DataError(f"{f}: cannot read parquet: {one_line(e, 200)}") from None


def _jsonl_objects(f: Path):
    """(line number, object) for each non-blank line; DataError names the file and line."""
    with open(f, encoding="utf-8", errors="surrogateescape") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{f}:{n}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{f}:{n}: expected a JSON object, got {type(row).__name__}")
            yield n, row


def _read_jsonl(f: Path) -> list[dict]:
    return [{**row, "_base_dir": str(f.parent)} for _, row in _jsonl_objects(f)]


def read_rows(files: Iterable[Path], skip_columns: Sequence[str] = ()) -> list[dict]:
    """All rows of the files, in order. `skip_columns` are not read from parquet (image bytes)."""
    rows: list[dict] = []
    for f in files:
        f = Path(f)
        if f.suffix == ".parquet":
            got = _read_parquet(f, skip_columns=skip_columns)
            for r in got:
                r["_base_dir"] = str(f.parent)
            rows.extend(got)
        elif f.suffix == ".jsonl":
            rows.extend(_read_jsonl(f))
        elif f.suffix == ".json":
            try:
                data = json.loads(f.read_text(encoding="utf-8", errors="surrogateescape"))
            except json.JSONDecodeError as e:
                raise DataError(f"{f}: not valid JSON ({e.msg}, line {e.lineno})") from e
            if isinstance(data, dict) and isinstance(data.get("data"), list):
                data = data["data"]
            if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
                raise DataError(f"{f}: expected a JSON list of rows (objects)")
            for r in data:
                r["_base_dir"] = str(f.parent)
            rows.extend(data)
        else:
            raise DataError(f"{f}: unsupported data file (want .parquet, .jsonl or .json)")
    return rows


# ----------------------------------------------------------------------------- images

def _decode(src, where: str) -> Image.Image:
    """A decoded image from a file path or file object, refused before decoding past MAX_IMAGE_PIXELS."""
    try:
        img = open_capped(src)
        img.load()
        return img
    except Exception as e:  # noqa: BLE001 - truncated, not an image, too many pixels: all one error
        raise DataError(f"{where}: cannot decode image ({type(e).__name__}: {one_line(e, 200)})") from None


def _decode_bytes(b: bytes, where: str) -> Image.Image:
    return _decode(io.BytesIO(b), where)


def open_image(value, base_dir: str | None = None, where: str = "image") -> Image.Image:
    """An RGB PIL image from any stored form: PIL image, bytes, {"bytes", "path"} struct,
    "data:image/...;base64,..." / base64 string, or a path (absolute, relative to the data file's
    directory, or to its `images/` sub-directory)."""
    if isinstance(value, Image.Image):
        img = value
    elif isinstance(value, (bytes, bytearray, memoryview)):
        img = _decode_bytes(bytes(value), where)
    elif isinstance(value, dict):
        if value.get("bytes"):
            img = _decode_bytes(value["bytes"], where)
        elif value.get("path"):
            return open_image(str(value["path"]), base_dir, where)
        else:
            raise DataError(f"{where}: empty image struct")
    elif isinstance(value, str):
        img = _open_str(value, base_dir, where)
    else:
        raise DataError(f"{where}: unsupported image value of type {type(value).__name__}")
    return to_rgb(img)


def _open_str(s: str, base_dir: str | None, where: str) -> Image.Image:
    if s.startswith("data:"):
        try:
            raw = base64.b64decode(s.split(",", 1)[-1])
        except (binascii.Error, ValueError) as e:
            raise DataError(f"{where}: bad base64 image data ({e})") from None
        return _decode_bytes(raw, where)
    cands = [Path(s)]
    if base_dir is not None and not Path(s).is_absolute():
        cands += [Path(base_dir) / s, Path(base_dir) / "images" / s]
    for c in cands:
        if c.is_file():
            return _decode(c, f"{where}: image file {c}")
    if len(s) > 256:  # long and not a file: try base64
        try:
            raw = base64.b64decode(s, validate=True)
        except (binascii.Error, ValueError):
            raw = None
        if raw is not None:
            return _decode_bytes(raw, where)
    raise DataError(f"{where}: image file {s!r} not found (looked in {', '.join(map(str, cands))})")


# ----------------------------------------------------------------------------- predictions

def read_predictions(path: str | os.PathLike) -> dict[str, str]:
    """{str(question_id): text} from a jsonl answer file. A malformed row or a repeated id raises
    DataError naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: predictions file not found")
    preds: dict[str, str] = {}
    lines: dict[str, int] = {}
    for n, row in _jsonl_objects(path):
        if "question_id" not in row or "text" not in row:
            raise DataError(f"{path}:{n}: expected an object with 'question_id' and 'text'")
        if not isinstance(row["text"], str):
            raise DataError(f"{path}:{n}: 'text' must be a string, got {type(row['text']).__name__}")
        if not isinstance(row["question_id"], (str, int, float)) or isinstance(row["question_id"], bool):
            raise DataError(f"{path}:{n}: 'question_id' must be a string or a number, "
                            f"got {type(row['question_id']).__name__}")
        key = id_key(row["question_id"])
        if key in lines:
            raise DataError(f"{path}:{n}: duplicate question_id {key!r} (first on line {lines[key]})")
        preds[key], lines[key] = row["text"], n
    return preds


def id_key(x) -> str:
    """Ids compare as strings; 12.0 (a float from some JSON writers) equals 12."""
    if isinstance(x, float) and x.is_integer():
        x = int(x)
    return str(x)


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")
    tmp.replace(path)
