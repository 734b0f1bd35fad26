"""`python -m infllava_jax.chat`'s stream: the generation thread ends with the stream.

A stream that stops early (a stop id, or the caller closing it) must not leave the generation
thread inside XLA: at interpreter exit such a thread aborts the process ("FATAL: exception not
rethrown", exit -6) after the answer was printed."""
from __future__ import annotations

import threading

import numpy as np

from infllava_jax import chat
from infllava_jax.evaluation import demo_fixtures


def test_stream_closed_early_leaves_no_generation_thread():
    model = demo_fixtures.tiny_model(grid=2)
    img = np.random.default_rng(0).integers(0, 255, (40, 60, 3)).astype(np.uint8)
    before = set(threading.enumerate())
    pieces = chat.stream(model, model.tokenizer, img, "What is it?", max_new_tokens=48)
    first = next(pieces, None)                     # one token out of 48, then the caller stops
    pieces.close()
    assert first is None or isinstance(first, str)
    started = [t for t in threading.enumerate() if t not in before and type(t) is threading.Thread]
    assert [t for t in started if t.is_alive()] == []   # (XLA's own threads show up as _DummyThread: not ours)
