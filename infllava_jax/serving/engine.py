"""The batching engine: requests that arrive together are decoded together through the eval
runner's jitted generator (`evaluation.runner.Generator`, one `generate.generate` program per
shape bucket), on `Limits.workers` worker threads: on a one-device server two batches decode at
once by default (a program's decode steps are small and serial; a second program uses the cores
the first leaves); on a multi-device mesh one (two programs with collectives, launched from two
threads, could deadlock).

Static batches: a worker takes the oldest waiting request and every waiting request of the
same program key (new-token bucket, greedy or sampled) up to the largest batch size. It waits
`batch_wait_s` after the oldest one arrived (or after the previous batch ended, if later: the
clients just answered send their next requests) for the batch to fill, longer (up to
`batch_max_wait_s`) while requests the server has received are still being prepared (their body
read, images decoded, prompt tokenized: `arriving()`), so clients that send together are decoded
together even when preparing them takes longer than `batch_wait_s`; the batch runs until all
its rows have stopped (a row that finishes early idles: its slot is refilled only by the next
batch). Requests that arrive meanwhile wait for the next batch. Sampled requests run alone in
row 0 (the sample then depends only on the request and its seed, not on what else is in flight).

Programs are bounded and compiled by `warmup()` before the first request: batch sizes x prompt
length buckets x image-count buckets x new-token buckets, greedy, plus the same at batch size 1
sampled, each twice: a batch with a streaming request runs the program whose every step hands
its tokens to the host (the `on_token` callback gives each streaming request its own row's
token; one such batch at a time, the callback object being shared); a batch with none runs the
one without that callback, which never waits for Python between steps (the callback needs the
GIL, which the server's request threads hold often). Images arrive as their resized bytes
(`pixels.resized_bytes`) and are normalised inside the program.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import itertools
import logging
import threading
import time
from typing import Callable

import numpy as np

from infllava_jax.errors import InputError, one_line
from infllava_jax.evaluation.runner import Generator, Request, Sampling, bucket
from infllava_jax.serving.prompt import Prepared
from infllava_jax.serving.schema import APIError
from infllava_jax.splice import IMAGE_TOKEN_INDEX
from infllava_jax.token_ids import check_row

log = logging.getLogger("infllava_jax.serving")


@dataclasses.dataclass(frozen=True)
class Limits:
    batch_sizes: tuple[int, ...] = (1, 4, 16)
    length_buckets: tuple[int, ...] = (256, 1024)    # prompt ids (one per image)
    image_buckets: tuple[int, ...] = (1, 4)          # the largest is the most images per request
    token_buckets: tuple[int, ...] = (64, 512)       # the largest is the most new tokens per request
    max_pending: int = 64                            # waiting + decoding; more -> 429
    batch_wait_s: float = 0.01                       # a batch waits this long to fill ...
    batch_max_wait_s: float = 0.25                   # ... and up to this while requests are being prepared
    workers: int = 0                                 # batches decoding at once; 0: 2 on one device, else 1


@dataclasses.dataclass
class Result:
    tokens: list[int]          # generated ids, the stop id left out, at most max_tokens
    finish_reason: str         # "stop" (a stop id) or "length"
    prompt_tokens: int         # prompt positions, images counted as the model sees them


@dataclasses.dataclass(eq=False)
class Job:
    prepared: Prepared
    max_tokens: int
    sampling: Sampling                       # temperature 0: greedy
    notify: Callable = lambda event: None    # from the engine's thread: ("token", id) | ("done", Result) | ("error", str)
    stream: bool = False
    cancelled: bool = False                  # the client left: its row's tokens are dropped
    bucket: int = 0
    arrived: float = 0.0
    emitted: int = 0
    finished: bool = False

    @property
    def key(self) -> tuple:
        return self.bucket, self.sampling.temperature > 0

    def feed(self, token: int) -> None:
        """One step's token of this row (streaming): passed on until a stop id or max_tokens."""
        if self.finished or self.cancelled:
            return
        if token in self.prepared.stop_ids:
            self.finished = True
            return
        self.notify(("token", token))
        self.emitted += 1
        self.finished = self.emitted >= self.max_tokens


class _Sink:
    """The program's `on_token` callback: one object for every program (it is a static argument),
    pointed at the rows of the batch being decoded."""
    jobs: list = []

    def __call__(self, step, tokens) -> None:
        for job, token in zip(self.jobs, np.asarray(tokens).tolist()):
            if job.stream:
                job.feed(int(token))


class Engine:
    def __init__(self, model, mesh=None, limits: Limits = Limits()):
        self.model, self.config, self.limits = model, model.config, limits
        self.stop_ids = tuple(int(s) for s in model.stop_ids)
        self.generators: dict[int, Generator] = {}
        for b in sorted(limits.batch_sizes):
            g = Generator(model.params, mesh, batch_size=b, pad_id=self.config.pad_token_id or 0,
                          stop_ids=self.stop_ids, length_buckets=limits.length_buckets,
                          image_buckets=limits.image_buckets)
            self.generators.setdefault(g.batch_size, g)
        self.max_batch = max(self.generators)
        devices = next(iter(self.generators.values())).mesh.size
        if limits.workers > 1 and devices > 1:
            # two SPMD programs launched from two threads can enqueue their collectives in
            # opposite orders on two devices: a deadlock (NCCL gives no cross-program ordering)
            raise InputError(f"workers={limits.workers} on a mesh of {devices} devices: concurrent batches are "
                             f"for one-device servers; use 1")
        self.workers = limits.workers or (2 if devices == 1 else 1)
        self.max_images, self.max_tokens = max(limits.image_buckets), max(limits.token_buckets)
        self.context = int(self.config.llm.max_position_embeddings)
        self._sink = _Sink()
        self._waiting: collections.deque[Job] = collections.deque()
        self._cv = threading.Condition()
        self.pending = 0
        self.arriving = 0                                  # requests received, not yet submitted
        self.batch_sizes: collections.Counter = collections.Counter()   # batches run, by row count
        self.busy_s = 0.0                                  # seconds with at least one batch decoding
        self._running, self._busy_since = 0, 0.0
        self._stream_lock = threading.Lock()               # one streaming batch at a time: the sink is shared
        self._closed = False
        self._last_end = 0.0                               # when the previous batch ended
        self._threads: list[threading.Thread] = []

    # -- admission ---------------------------------------------------------------------------
    def make_job(self, prepared: Prepared, max_tokens: int | None, sampling: Sampling, **kw) -> Job:
        """A job for a prepared request, or APIError 400 for one this server cannot take."""
        n_img = len(prepared.images)
        try:
            prepared.ids = check_row(prepared.ids, None, self.config, n_img, "of the prompt")[0]
        except InputError as e:
            raise APIError(400, f"messages: {e}", param="messages") from None
        if len(prepared.ids) > max(self.limits.length_buckets):
            raise APIError(400, f"the prompt is {len(prepared.ids)} tokens; this server takes prompts of up to "
                                f"{max(self.limits.length_buckets)} tokens", param="messages",
                           code="context_length_exceeded")
        n = self.max_tokens if max_tokens is None else int(max_tokens)
        if n > self.max_tokens:
            raise APIError(400, f"max_tokens={n}: this server generates at most {self.max_tokens} tokens",
                           param="max_tokens", code="invalid_value")
        prompt = self.prompt_tokens(prepared)
        if prompt + n > self.context:
            raise APIError(400, f"the prompt ({prompt} tokens with its images) + max_tokens ({n}) exceed the model's "
                                f"context of {self.context} tokens", param="messages", code="context_length_exceeded")
        return Job(prepared, n, sampling, bucket=bucket(n, self.limits.token_buckets), **kw)

    def prompt_tokens(self, prepared: Prepared) -> int:
        n_img = int(np.sum(prepared.ids == IMAGE_TOKEN_INDEX))
        return len(prepared.ids) + n_img * (self.config.tokens_per_image - 1)

    @contextlib.contextmanager
    def arriving_request(self):
        """Around a request's preparation and `submit`: the worker waits for it (up to
        `batch_max_wait_s`) before it closes a batch."""
        with self._cv:
            self.arriving += 1
        try:
            yield
        finally:
            with self._cv:
                self.arriving -= 1
                self._cv.notify_all()

    def submit(self, job: Job) -> None:
        """Queue a job for the worker; APIError 429 when `max_pending` jobs are in."""
        with self._cv:
            if self._closed:
                raise APIError(503, "the server is shutting down", type="server_error", code="unavailable")
            if self.pending >= self.limits.max_pending:
                raise APIError(429, f"the server is busy ({self.pending} requests in, the limit is "
                                    f"{self.limits.max_pending}); retry in a second", type="rate_limit_error",
                               code="rate_limit_exceeded", headers={"Retry-After": "1"})
            self.pending += 1
            job.arrived = time.monotonic()
            self._waiting.append(job)
            self._cv.notify_all()

    # -- the worker ----------------------------------------------------------------------------
    def start(self) -> None:
        self._threads = [threading.Thread(target=self._serve, name=f"infllava-engine-{i}", daemon=True)
                         for i in range(self.workers)]
        for t in self._threads:
            t.start()

    def close(self) -> None:
        """Stop taking batches and wait for the running ones (a thread left inside XLA aborts the exit)."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        for t in self._threads:
            if t is not threading.current_thread():
                t.join()

    def _serve(self) -> None:
        while (jobs := self._next_batch()) is not None:
            self.run(jobs)

    def _next_batch(self) -> list[Job] | None:
        """The next batch (each worker takes its own); None once the engine is closed."""
        with self._cv:
            while True:
                while not self._waiting and not self._closed:
                    self._cv.wait()
                if self._closed:
                    return None
                same = self._fill(self._waiting[0])
                for j in same:
                    self._waiting.remove(j)
                if same:
                    return same

    def _fill(self, first: Job) -> list[Job]:
        """Waiting jobs of `first`'s key, once they fill a batch or its wait is over (the
        condition held); [] if another worker took `first` meanwhile."""
        limit = 1 if first.key[1] else self.max_batch
        start = max(first.arrived, self._last_end)
        deadline = start + self.limits.batch_wait_s
        cap = start + max(self.limits.batch_wait_s, self.limits.batch_max_wait_s)
        while first in self._waiting:
            same = [j for j in self._waiting if j.key == first.key][:limit]
            left = (cap if self.arriving else deadline) - time.monotonic()
            if len(same) >= limit or left <= 0 or self._closed:
                return same
            self._cv.wait(left)
        return []

    def run(self, jobs: list[Job]) -> None:
        """Decode a batch and notify each job; a failure fails this batch only."""
        live = [j for j in jobs if not j.cancelled]
        with self._cv:
            self.batch_sizes[len(live)] += 1
            if self._running == 0:
                self._busy_since = time.perf_counter()
            self._running += 1
        try:
            for job, result in zip(live, self.decode(live) if live else []):
                job.notify(("done", result))
        except Exception as e:  # noqa: BLE001 - our bug or the device's: the clients get a 500, we go on
            log.exception("decoding a batch of %d failed", len(live))
            for job in live:
                job.notify(("error", f"{type(e).__name__}: {one_line(e)}"))
        finally:
            with self._cv:
                self.pending -= len(jobs)
                self._last_end = time.monotonic()
                self._running -= 1
                if self._running == 0:
                    self.busy_s += time.perf_counter() - self._busy_since

    def decode(self, jobs: list[Job]) -> list[Result]:
        """One program run for jobs of one key (synchronous; predict.py calls it directly)."""
        gen = self.generators[bucket(len(jobs), tuple(self.generators))]
        reqs = [Request(j.prepared.ids.copy(), list(j.prepared.images)) for j in jobs]
        run = lambda sink: gen.generate(self.config, reqs, max_new_tokens=jobs[0].bucket, sampling=jobs[0].sampling,
                                        batch_index=0, on_token=sink)
        if not any(j.stream for j in jobs):
            out = run(None)                  # the program without the per-step host callback
        else:
            with self._stream_lock:          # one streaming batch at a time: the sink is shared
                self._sink.jobs = jobs
                try:
                    out = run(self._sink)
                finally:
                    self._sink.jobs = []
        return [self._result(j, toks) for j, toks in zip(jobs, out)]

    def _result(self, job: Job, tokens) -> Result:
        toks = [int(t) for t in tokens]
        stop = next((i for i, t in enumerate(toks) if t in job.prepared.stop_ids), None)
        if stop is not None and stop < job.max_tokens:
            return Result(toks[:stop], "stop", self.prompt_tokens(job.prepared))
        return Result(toks[:job.max_tokens], "length", self.prompt_tokens(job.prepared))

    def warmup(self, progress: Callable[[str], None] = lambda s: None) -> int:
        """Compile every program of the bucket grid (see the module docstring); returns the count."""
        from infllava_jax.inputs import image_size
        size = image_size(self.config, self.model.usage.pixels)
        greedy, sampled = Sampling(), Sampling(temperature=1.0, seed=0)
        plan = [(b, s) for b in self.generators for s in (greedy, sampled) if s is greedy or b == min(self.generators)]
        t0, done = time.perf_counter(), 0
        total = 2 * len(plan) * len(self.limits.length_buckets) * len(self.limits.image_buckets) * len(self.limits.token_buckets)
        for b, s in plan:
            for L in self.limits.length_buckets:
                for k in self.limits.image_buckets:
                    ids = np.array([0] * (L - k) + [IMAGE_TOKEN_INDEX] * k, np.int32)
                    images = [np.zeros((size, size, 3), np.uint8)] * k   # what prepare gives
                    for n, stream in itertools.product(self.limits.token_buckets, (False, True)):
                        job = Job(Prepared(ids, images, self.stop_ids), n, s, bucket=n, stream=stream)
                        self.decode([job] * b)
                        done += 1
                        progress(f"warm-up: {done}/{total} programs compiled ({time.perf_counter() - t0:.1f} s)")
        return done
