"""Benchmark tasks: where the data is, the prompt text, the images, the id, max new tokens.

The text returned by `Task.text(row)` is what lmms-eval's task sends; the model adapter puts
`"<image>\\n"` (one `<image>` per image, joined by spaces) before it and wraps it in the llama3
conversation template (docs/evaluation.md). Prompts are written from lmms-eval's task files of
July 2024 (`lmms_eval/tasks/<task>/utils.py` and yaml), e.g. MMBench's doubled newline before
the instruction comes from its post_prompt starting with "\\n".
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable, Iterator

from infllava_jax.evaluation import mmbench, mmmu
from infllava_jax.evaluation.datasets import DataError, find_task_data, id_key, read_rows

SHORT = "Answer the question using a single word or phrase."
LETTER = "Answer with the option's letter from the given choices directly."
MMBENCH_CN = "请直接使用所提供的选项字母作为答案回答。"
MMVET_PRE = "Please think step by step and try to provide best answer to the following question: \n\n"
JUDGE_MAX_NEW_TOKENS = 1024  # lmms-eval asks for 32768; capped (config: max_new_tokens)


def _letters_block(choices) -> str:
    return "\n".join(f"{chr(65 + i)}. {c}" for i, c in enumerate(choices))


def _pope(r):
    return f"{r['question'].strip()}\n{SHORT}"


def _sqa(r):
    hint = r.get("hint") or ""
    context = f"Context: {hint}\n" if hint else ""
    return f"{context}{r['question']}\n{_letters_block(r['choices'])}\n{LETTER}"


def _mmbench(lang: str):
    def text(r):
        hint = r.get("hint")
        drop = mmbench.isna(hint) or (lang == "en" and hint == "nan")  # cn keeps a literal "nan"
        opts = mmbench.options_prompt(r)
        q = f"{r['question']} {opts}" if drop else f"{hint} {r['question']} {opts}"
        return f"{q}\n\n{LETTER if lang == 'en' else MMBENCH_CN}"
    return text


def _seed(r):
    q = r["question"] + "\n" + "\n".join(f"{k.upper()}. {r['choice_' + k]}" for k in "abcd")
    return f"{q}\n{LETTER}"


def _short(r):
    return f"{r['question']}\n{SHORT}"


def _textvqa(r):
    return f"{r['question'].capitalize()}\n{SHORT}"


def _okvqa(r):
    return f"{r['question']}\nWhen the provided information is insufficient, respond with 'Unanswerable'.\n{SHORT}"


def _ai2d(r):
    return f"{r['question']}\n{_letters_block(r['options'])}\n{LETTER}"


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    text: Callable[[dict], str]
    id_field: str | None            # None: the 0-based row index (ScienceQA, AI2D)
    max_new_tokens: int
    dirs: tuple[str, ...]           # names under the data root (file stem or directory)
    globs: tuple[str, ...] = ()     # preferred data files inside such a directory
    image_columns: tuple[str, ...] = ("image",)
    keep: Callable[[dict], bool] | None = None
    judge: bool = False             # scored by a GPT judge outside eval.py
    image_table_globs: tuple[str, ...] = ()  # GQA: images live in a separate table keyed by id

    def image_fields(self, row) -> list[str]:
        if self.name == "mmmu":
            return mmmu.image_fields(row)
        return list(self.image_columns)

    def find_files(self, root) -> list[Path]:
        return find_task_data(root, (self.name,) + self.dirs, self.globs)

    def load(self, root) -> list[dict]:
        """Rows without their image bytes (filtered, e.g. SEED image rows only), each with `_qid`
        (the id as a string), `_row` (index in the filtered data) and `_file`/`_pos` (where it
        is stored, for `iter_images`)."""
        files = [f for f in self.find_files(root) if not _is_image_table(f, self)]
        rows = []
        for k, f in enumerate(files):
            got = read_rows([f], skip_columns=self.all_image_columns)
            for pos, r in enumerate(got):
                r["_file"], r["_pos"] = str(f), pos
            rows.extend(got)
        if self.keep is not None:
            rows = [r for r in rows if self.keep(r)]
        seen = set()
        for i, r in enumerate(rows):
            if self.id_field is None:
                r["_qid"] = str(i)
            else:
                if self.id_field not in r:
                    raise DataError(f"{r['_file']}: row {r['_pos']} has no id field {self.id_field!r}")
                r["_qid"] = id_key(r[self.id_field])
            if r["_qid"] in seen:
                raise DataError(f"{r['_file']}: duplicate {self.id_field or 'row'} id {r['_qid']!r}")
            seen.add(r["_qid"])
            r["_row"] = i
        return rows

    def iter_images(self, rows, batch_rows: int = 32) -> Iterator[list]:
        """The stored image values of each row, in row order (a list per row); parquet image
        columns are streamed in batches, never all in memory."""
        table = _image_table(self, rows) if self.image_table_globs else None
        by_file: dict[str, list] = {}
        for r in rows:
            by_file.setdefault(r["_file"], []).append(r)
        for f, frows in by_file.items():  # rows are in file order (load keeps it)
            if f.endswith(".parquet"):
                wanted = {r["_pos"]: r for r in frows}
                last = max(wanted)
                for pos, values in enumerate(_parquet_image_columns(Path(f), self.all_image_columns, batch_rows)):
                    if pos in wanted:
                        yield _row_images(self, wanted[pos], values, table)
                    if pos >= last:
                        break
            else:
                for r in frows:
                    yield _row_images(self, r, r, table)

    @property
    def all_image_columns(self) -> tuple[str, ...]:
        return self.image_columns + ((tuple(f"image_{k}" for k in range(1, 8))) if self.name == "mmmu" else ())


def _parquet_image_columns(f: Path, columns, batch_rows: int):
    import pyarrow.parquet as pq
    pf = pq.ParquetFile(f)
    cols = [c for c in columns if c in pf.schema_arrow.names]
    if not cols:
        yield from ({} for _ in range(pf.metadata.num_rows))
        return
    for batch in pf.iter_batches(batch_size=batch_rows, columns=cols):
        data = batch.to_pydict()
        for i in range(batch.num_rows):
            yield {c: data[c][i] for c in cols}


def _row_images(task: "Task", row, values, table) -> list:
    out = []
    for f in task.image_fields(row):
        v = values.get(f)
        if v is None:
            continue
        out.extend(v if isinstance(v, list) else [v])
    if not out and table is not None:
        out = [table(row)]
    return out


def _is_image_table(f: Path, task: Task) -> bool:
    return bool(task.image_table_globs) and any(part.endswith("images") for part in f.parts[:-1])


def _image_table(task: Task, rows):
    """GQA: lmms-lab ships images as a separate table (id, image); rows refer to it by imageId.
    Accepts such parquet files in a directory named *images next to the rows, or image files
    named <imageId>.jpg/.png under the data directory."""
    roots = {Path(r["_file"]).parent for r in rows}
    tables = set()
    for root in list(roots) + [p.parent for p in roots]:
        for g in task.image_table_globs:
            tables |= {f for f in root.glob(g) if f.is_file() and f.suffix == ".parquet"}
    table = {}
    for r in read_rows(sorted(tables)):
        table[id_key(r["id"])] = r["image"]

    def lookup(row):
        key = id_key(row.get("imageId"))
        if key in table:
            return table[key]
        for root in roots:
            for p in root.glob(f"**/{key}.*"):
                if p.suffix.lower() in (".jpg", ".jpeg", ".png"):
                    return str(p)
        raise DataError(f"{task.name}: no image for imageId {key!r} (no image table, no file "
                        f"{key}.jpg under {', '.join(map(str, roots))})")
    return lookup


TASKS: dict[str, Task] = {t.name: t for t in [
    Task("pope", _pope, "question_id", 128, ("POPE",), ("**/test-*.parquet",)),
    Task("scienceqa_img", _sqa, None, 16, ("ScienceQA",), ("ScienceQA-IMG/test-*.parquet", "**/test-*.parquet")),
    Task("mmbench_en", _mmbench("en"), "index", 1024, ("MMBench",), ("en/dev-*.parquet", "**/dev-*.parquet")),
    Task("mmbench_cn", _mmbench("cn"), "index", 256, ("MMBench",), ("cn/dev-*.parquet", "**/dev-*.parquet")),
    Task("seedbench", _seed, "question_id", 1024, ("SEED-Bench", "seed"), ("**/test-*.parquet",),
         keep=lambda r: r.get("data_type", "image") == "image"),
    Task("gqa", _short, "id", 16, ("GQA",),
         ("testdev_balanced_instructions/testdev-*.parquet", "**/*instructions*/*.parquet"),
         image_table_globs=("testdev_balanced_images/*.parquet", "*images/*.parquet")),
    Task("textvqa", _textvqa, "question_id", 1024, ("TextVQA",), ("**/validation-*.parquet",)),
    Task("ok_vqa", _okvqa, "question_id", 1024, ("OK-VQA", "okvqa"), ("**/val2014-*.parquet",)),
    Task("ai2d", _ai2d, None, 16, ("AI2D",), ("**/test-*.parquet",)),
    Task("mmmu", mmmu.prompt, "id", 128, ("MMMU",), ("**/validation-*.parquet",), image_columns=()),
    Task("docvqa", _short, "questionId", 32, ("DocVQA",), ("DocVQA/validation-*.parquet", "**/validation-*.parquet")),
    Task("infovqa", _short, "questionId", 32, ("InfoVQA", "DocVQA"),
         ("InfographicVQA/validation-*.parquet", "**/validation-*.parquet")),
    # the project's synthetic high-resolution VQA set (infllava_jax/study/scenes.py): test.jsonl
    Task("hires_synth", _short, "question_id", 16, ("test",)),
    Task("llava_in_the_wild", lambda r: r["question"], "question_id", JUDGE_MAX_NEW_TOKENS,
         ("llava-bench-in-the-wild", "llava_bench"), ("**/train-*.parquet",), judge=True),
    Task("mmvet", lambda r: MMVET_PRE + r["question"], "question_id", JUDGE_MAX_NEW_TOKENS,
         ("MMVet", "mm-vet"), ("**/test-*.parquet",), judge=True),
]}

ALIASES = {"sqa": "scienceqa_img", "scienceqa": "scienceqa_img", "mmbench": "mmbench_en",
           "mmbench_en_dev": "mmbench_en", "mmbench_cn_dev": "mmbench_cn", "seed": "seedbench",
           "seed_bench": "seedbench", "textvqa_val": "textvqa", "ok_vqa_val2014": "ok_vqa",
           "okvqa": "ok_vqa", "mmmu_val": "mmmu", "docvqa_val": "docvqa", "infovqa_val": "infovqa",
           "llava_bench": "llava_in_the_wild", "llavabench": "llava_in_the_wild", "mm_vet": "mmvet"}


def get_task(name: str) -> Task:
    key = ALIASES.get(name.lower(), name.lower())
    if key not in TASKS:
        raise KeyError(f"unknown task {name!r}; known: {', '.join(TASKS)}")
    return TASKS[key]
