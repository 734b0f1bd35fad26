"""Sweeps: every (task, resolution) pair of a config, one model, one set of compiled programs.

Writes into OUT:
  predictions/<task>_res<res>.jsonl   LLaVA answer files {question_id, prompt, text, answer_id, model_id, metadata}
  judge/<task>_res<res>.jsonl         LLaVA-Bench / MM-Vet: what a GPT judge needs (question,
                                      reference, context, answer); MM-Vet also <..>.json {v1_id: answer}
  results.json                        metrics per pair, compiled programs, examples/s, the config
  results.md                          tasks x resolutions table of the main metric (%)
  scores.png                          score against resolution, one line per task
"""
from __future__ import annotations

import dataclasses
import json
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jax
from tqdm import tqdm

from infllava_jax import sharding as sharding_lib
from infllava_jax.api import InfLlava
from infllava_jax import conversation
from infllava_jax.evaluation import prompting, scorers
from infllava_jax.evaluation.datasets import id_key, open_image, write_jsonl
from infllava_jax.evaluation.runner import Generator, Request, Sampling, grid_config, pixel_size
from infllava_jax.evaluation.tasks import Task, get_task
from infllava_jax.pixels import preprocess


def parse_scorers(spec: str) -> dict:
    """"pope=llava,docvqa=lmms_eval_2024_07" -> {task: scorer}."""
    out = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        k, _, v = part.partition("=")
        out[get_task(k).name] = v
    return out


def _prefetch(it, depth: int = 2):
    """Run a generator in a background thread, `depth` items ahead."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()

    def work():
        try:
            for x in it:
                q.put(x)
        except BaseException as e:  # re-raised in the consumer
            q.put(e)
        q.put(done)

    threading.Thread(target=work, daemon=True).start()
    while True:
        x = q.get()
        if x is done:
            return
        if isinstance(x, BaseException):
            raise x
        yield x


class Sweep:
    """Model + tokenizer + generator, reusable across tasks and resolutions."""

    def __init__(self, cfg, ckpt: str, *, model: InfLlava | None = None, tokenizer=None, log=print):
        self.cfg, self.ckpt, self.log = cfg, str(ckpt), log
        self.mesh = sharding_lib.make_mesh(cfg.mesh or "data=-1")   # default: data parallel
        self.model = model or InfLlava.from_pretrained(ckpt, mesh=self.mesh, quant=cfg.get("quant") or None)
        self.config = self.model.config.with_runtime(dtype=cfg.dtype or None)
        # the checkpoint's recorded template / pixels / image mode / BOS unless the config names them
        self.usage = self.model.usage.override(template=cfg.get("template", ""), pixels=cfg.pixels,
                                               image_mode=cfg.image_mode, double_bos=cfg.double_bos)
        self.tok = tokenizer or prompting.get_tokenizer(cfg.tokenizer, ckpt, self.config.llm.vocab_size, self.usage)
        pad = self.config.pad_token_id if self.config.pad_token_id is not None else self.tok.pad_token_id
        self.gen = Generator(self.model.params, self.mesh, batch_size=cfg.batch_size, pad_id=pad or 0,
                             stop_ids=conversation.stop_ids(self.usage, self.tok), length_buckets=tuple(cfg.length_buckets),
                             image_buckets=tuple(cfg.image_buckets))
        self.scorer_names = parse_scorers(cfg.scorers)
        self.sampling = Sampling(float(cfg.temperature), float(cfg.top_p), int(cfg.seed))
        self._pool = ThreadPoolExecutor(max(1, int(cfg.workers)))

    def max_new_tokens(self, task: Task) -> int:
        cap = int(self.cfg.max_new_tokens)
        return min(task.max_new_tokens, cap) if cap > 0 else task.max_new_tokens

    def _requests(self, task: Task, rows, size: int):
        """Batches of (rows, Requests, prompts), images decoded and preprocessed in threads."""
        B = self.gen.batch_size

        def one(row, values):
            text = task.text(row)
            imgs = [preprocess(open_image(v, row.get("_base_dir"), f"{row.get('_file')}:{row.get('_pos')}"),
                               size, self.usage.image_mode) for v in values]
            ids = prompting.encode(self.tok, text, len(imgs), usage=self.usage)
            return Request(ids, imgs), text

        def batches():
            pending = []
            for row, values in zip(rows, task.iter_images(rows)):
                pending.append(self._pool.submit(one, row, values))
                if len(pending) == B:
                    yield pending
                    pending = []
            if pending:
                yield pending

        start = 0
        for futs in batches():
            got = [f.result() for f in futs]
            yield rows[start:start + len(got)], [g[0] for g in got], [g[1] for g in got]
            start += len(got)

    def run_pair(self, task: Task, rows, res: int, out: Path | None) -> dict:
        config = grid_config(self.config, res)
        size = pixel_size(config, self.usage.pixels)
        n_new = self.max_new_tokens(task)
        answers = []
        compile_before = self.gen.compile_seconds
        t0 = time.perf_counter()
        show = jax.process_index() == 0 and bool(self.cfg.progress)
        bar = tqdm(total=len(rows), desc=f"{task.name} @ {res}", unit="ex", disable=not show)
        for brows, reqs, texts in _prefetch(self._requests(task, rows, size)):
            outs = self.gen.generate(config, reqs, max_new_tokens=n_new, sampling=self.sampling,
                                     image_size=size)
            for r, o, text in zip(brows, outs, texts):
                answers.append(dict(question_id=r[task.id_field] if task.id_field else r["_row"],
                                    prompt=text, text=prompting.decode(self.tok, o),
                                    answer_id=f"{task.name}-{res}-{r['_row']}", model_id=self.cfg.model_id,
                                    metadata=dict(new_tokens=int(len(o)), grid=list(config.grid))))
            bar.update(len(brows))
        bar.close()
        seconds = time.perf_counter() - t0
        compile_s = self.gen.compile_seconds - compile_before
        rec = dict(examples=len(rows), seconds=round(seconds, 3), compile_seconds=round(compile_s, 3),
                   examples_per_s=round(len(rows) / max(seconds - compile_s, 1e-9), 3),
                   max_new_tokens=n_new, grid=list(config.grid), pixels=size)
        if out is not None and jax.process_index() == 0:
            write_jsonl(out / "predictions" / f"{task.name}_res{res}.jsonl", answers)
            if task.judge:
                write_judge_inputs(task, rows, answers, out / "judge" / f"{task.name}_res{res}")
        if not task.judge:
            preds = {id_key(a["question_id"]): a["text"] for a in answers}
            rec["metrics"] = scorers.score(task.name, rows, preds, self.scorer_names.get(task.name))
        return rec


def write_judge_inputs(task: Task, rows, answers, stem: Path) -> None:
    """What the GPT judge reads (LLaVA eval_gpt_review_bench / MM-Vet grader inputs); no call made."""
    recs = []
    for r, a in zip(rows, answers):
        recs.append(dict(question_id=a["question_id"], category=r.get("category", r.get("capability")),
                         question=r.get("question"), context=r.get("caption"),
                         reference=r.get("gpt_answer", r.get("answer")), answer=a["text"]))
    write_jsonl(stem.with_suffix(".jsonl"), recs)
    if task.name == "mmvet":  # the official MM-Vet grader reads {"v1_<id>": answer}
        key = lambda q: str(q) if str(q).startswith("v1_") else f"v1_{q}"
        stem.with_suffix(".json").write_text(json.dumps({key(a["question_id"]): a["text"] for a in answers},
                                                        indent=2, ensure_ascii=False))


# ----------------------------------------------------------------------------- whole sweep

def run(cfg, *, ckpt: str, data: str, out: str, log=print, model=None, tokenizer=None) -> dict:
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    sweep = Sweep(cfg, ckpt, model=model, tokenizer=tokenizer, log=log)
    tasks = [get_task(t) for t in cfg.tasks]
    resolutions = [int(r) for r in cfg.res]
    results: dict = {}
    t_all = time.perf_counter()
    examples = 0
    for task in tasks:
        rows = task.load(data)
        if int(cfg.limit) > 0:
            rows = rows[:int(cfg.limit)]
        for res in resolutions:
            rec = sweep.run_pair(task, rows, res, out_dir)
            examples += rec["examples"]
            results.setdefault(task.name, {})[str(res)] = rec
            m = rec.get("metrics")
            log(f"{task.name} @ {res}: " + (f"{100 * scorers.main_metric(m):.2f}" if m else "judge inputs written")
                + f"  ({rec['examples']} ex, {rec['examples_per_s']:.2f} ex/s, programs so far {sweep.gen.compiles})")
    seconds = time.perf_counter() - t_all
    summary = dict(
        ckpt=str(ckpt), data=str(data), config=cfg.to_dict(), usage=dataclasses.asdict(sweep.usage), results=results,
        compiled_programs=sweep.gen.compiles, compile_seconds=round(sweep.gen.compile_seconds, 3),
        program_bound=program_bound(cfg, tasks, sweep),
        examples=examples, seconds=round(seconds, 3),
        examples_per_s=round(examples / max(seconds - sweep.gen.compile_seconds, 1e-9), 3),
        devices=jax.device_count(), processes=jax.process_count(), mesh=dict(sweep.mesh.shape))
    if jax.process_index() == 0:
        (out_dir / "results.json").write_text(json.dumps(summary, indent=2, default=str))
        (out_dir / "results.md").write_text(results_markdown(summary, tasks, resolutions))
        plot(summary, tasks, resolutions, out_dir / "scores.png")
    log(f"compiled programs: {sweep.gen.compiles} (bound {summary['program_bound']}), "
        f"{summary['examples_per_s']:.2f} examples/s excluding {summary['compile_seconds']:.1f} s of compilation")
    return summary


def program_bound(cfg, tasks, sweep: Sweep) -> int:
    """Upper bound on compiled programs: grids x new-token buckets x length x image buckets."""
    new_tokens = {sweep.max_new_tokens(t) for t in tasks}
    return len(set(cfg.res)) * len(new_tokens) * len(cfg.length_buckets) * len(cfg.image_buckets)


def results_markdown(summary: dict, tasks, resolutions) -> str:
    head = "| task | metric | " + " | ".join(str(r) for r in resolutions) + " |"
    lines = [f"# Results: {summary['ckpt']}", "", head, "|" + "---|" * (len(resolutions) + 2)]
    for t in tasks:
        cells, metric = [], "judge"
        for r in resolutions:
            m = summary["results"][t.name][str(r)].get("metrics")
            if m:
                metric = "anls" if "anls" in m else "accuracy"
                cells.append(f"{100 * scorers.main_metric(m):.2f}")
            else:
                cells.append("judge inputs")
        lines.append(f"| {t.name} | {metric} | " + " | ".join(cells) + " |")
    lines += ["", f"Resolution = grid n x n with n = res / 336 (336 = the 1x1 grid, DEM applied). "
              f"Scores in %. Compiled programs: {summary['compiled_programs']} (bound "
              f"{summary['program_bound']}); {summary['examples_per_s']:.2f} examples/s excluding "
              f"{summary['compile_seconds']:.1f} s of compilation; {summary['devices']} device(s).", ""]
    return "\n".join(lines)


def plot(summary: dict, tasks, resolutions, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for t in tasks:
        ys = [summary["results"][t.name][str(r)].get("metrics") for r in resolutions]
        if not all(ys):
            continue
        ax.plot(resolutions, [100 * scorers.main_metric(m) for m in ys], marker="o", label=t.name)
    ax.set_xlabel("resolution (px; grid n = res / 336)")
    ax.set_ylabel("score (%)")
    ax.set_ylim(0, 100)
    ax.set_xticks(resolutions)
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
