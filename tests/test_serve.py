"""`python -m infllava_jax.serve` in a subprocess on 127.0.0.1, driven by the real `openai`
client: plain and streamed answers, two images, batching, and every bad request of
docs/serving.md ("Limits") answered in OpenAI's error body and followed by a good answer."""
import base64
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx2 as httpx
import numpy as np
import openai
import pytest
from PIL import Image

slow = pytest.mark.slow   # the server compiles its programs before it listens (~1-2 min on 2 cores)

ROOT = Path(__file__).resolve().parents[1]
QUESTION = "What is in the image?"


def png_url(w=48, h=40, seed=0, fmt="PNG") -> str:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()


def user(*urls, text=QUESTION) -> list:
    parts = [{"type": "image_url", "image_url": {"url": u}} for u in urls] + [{"type": "text", "text": text}]
    return [{"role": "user", "content": parts}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from infllava_jax import presets
    from infllava_jax.api import InfLlava
    root = tmp_path_factory.mktemp("serve")
    InfLlava.init(presets.tiny(), tokenizer="tiny").save_pretrained(root / "tiny")
    images = root / "images"
    images.mkdir()
    Image.fromarray(np.full((30, 40, 3), 200, np.uint8)).save(images / "grey.png")
    Image.fromarray(np.full((30, 40, 3), 9, np.uint8)).save(root / "secret.png")
    (images / "link.png").symlink_to(root / "secret.png")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}   # one CPU device
    cmd = [sys.executable, "-m", "infllava_jax.serve", "--ckpt", str(root / "tiny"), "--port", str(port),
           "--image-dir", str(images), "--batch-sizes", "1,4", "--length-buckets", "128", "--image-buckets", "2",
           "--max-tokens-buckets", "256", "--max-pending", "4", "--max-image-bytes", "200000",
           "--max-image-pixels", "1000000", "--batch-wait-ms", "50"]
    log = open(root / "server.log", "w")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        for _ in range(900):   # bounded: 15 min at most on a loaded 2-core machine
            if proc.poll() is not None:
                raise AssertionError(f"server exited {proc.returncode}:\n{(root / 'server.log').read_text()[-3000:]}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(1)
        else:
            raise AssertionError("server not ready after 15 min")
        yield {"port": port, "root": root, "log": root / "server.log",
               "client": openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0,
                                       timeout=120)}
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


def ask(client, messages, **kw):
    kw.setdefault("max_tokens", 12)
    kw.setdefault("temperature", 0)
    return client.chat.completions.create(model="tiny", messages=messages, **kw)


def good(server):
    r = ask(server["client"], user(png_url()))
    assert r.choices[0].finish_reason in ("stop", "length") and isinstance(r.choices[0].message.content, str)
    return r


@slow
def test_models_health_and_plain_answer(server):
    c = server["client"]
    assert [m.id for m in c.models.list()] == ["tiny"]
    health = httpx.get(f"http://127.0.0.1:{server['port']}/health").json()
    assert health["status"] == "ok" and health["pending"] == 0 and set(health) == {"status", "pending", "busy_s", "batches"}
    r = ask(c, user(png_url()), max_tokens=20)
    ch = r.choices[0]
    assert ch.message.role == "assistant" and r.model == "tiny" and r.object == "chat.completion"
    assert ch.finish_reason in ("stop", "length") and 1 <= r.usage.completion_tokens <= 20
    assert r.usage.prompt_tokens == 87    # 52 prompt ids: 51 text + one image of 36 tokens (tiny preset)
    assert ask(c, user(png_url()), max_tokens=20).choices[0].message.content == ch.message.content   # greedy


@slow
def test_streamed_answer_equals_plain(server):
    c = server["client"]
    for max_tokens, stop in ((30, None), (30, ["e"])):
        plain = ask(c, user(png_url(seed=3)), max_tokens=max_tokens, stop=stop).choices[0]
        chunks = list(ask(c, user(png_url(seed=3)), max_tokens=max_tokens, stop=stop, stream=True,
                          stream_options={"include_usage": True}))
        text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
        finish = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
        assert text == plain.message.content and finish == [plain.finish_reason]
        assert chunks[-1].usage is not None and chunks[-1].usage.prompt_tokens == 87
        if stop:
            assert "e" not in text


@slow
def test_two_images_and_a_local_path(server):
    c = server["client"]
    r = ask(c, user(png_url(seed=1), png_url(seed=2, fmt="JPEG")))
    assert r.usage.prompt_tokens == 87 + 1 + 36   # "<image> <image>\n": a space and a second image of 36
    swapped = ask(c, user(png_url(seed=2, fmt="JPEG"), png_url(seed=1)))
    assert swapped.usage.prompt_tokens == r.usage.prompt_tokens
    r = ask(c, user("grey.png"))                   # inside --image-dir
    assert r.usage.prompt_tokens == 87


@slow
def test_concurrent_answers_equal_sequential(server):
    c = server["client"]
    msgs = [user(png_url(seed=10 + i), text=q) for i, q in enumerate(
        ["What is in the image?", "Describe the image.", "How many dots are inside the circle?", "Which corner?"])]
    alone = [ask(c, m, max_tokens=16).choices[0].message.content for m in msgs]
    together = [None] * len(msgs)

    def run(i):
        together[i] = ask(c, msgs[i], max_tokens=16).choices[0].message.content

    batches = lambda: httpx.get(f"http://127.0.0.1:{server['port']}/health").json()["batches"]
    before = batches()
    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(msgs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert together == alone and len(set(alone)) > 1   # different questions, each its own answer
    ran = {k: v - before.get(k, 0) for k, v in batches().items() if v != before.get(k, 0)}
    assert sum(int(k) * v for k, v in ran.items()) == 4 and sum(ran.values()) < 4, ran   # decoded together


@slow
def test_sampling_is_seeded(server):
    c = server["client"]
    a = ask(c, user(png_url()), temperature=1.0, top_p=0.9, seed=7, max_tokens=16).choices[0].message.content
    b = ask(c, user(png_url()), temperature=1.0, top_p=0.9, seed=7, max_tokens=16).choices[0].message.content
    other = ask(c, user(png_url()), temperature=1.0, top_p=0.9, seed=8, max_tokens=16).choices[0].message.content
    assert a == b and a != other


def _bad_requests(root: Path):
    huge = "data:image/png;base64," + "A" * 400_000              # > --max-image-bytes, never decoded
    buf = io.BytesIO()
    Image.new("RGB", (2000, 1000)).save(buf, "PNG")               # 2 Mpx > --max-image-pixels, a small file
    many_px = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    text = "data:image/png;base64," + base64.b64encode(b"hello, I am not an image").decode()
    return [
        ("unknown field", dict(messages=user(png_url()), extra_body={"logit_bias_x": 1}), "unknown_field", "logit_bias_x"),
        ("broken base64", dict(messages=user("data:image/png;base64,iVBOR%%%")), "invalid_image", None),
        ("huge base64", dict(messages=user(huge)), "image_too_large", None),
        ("too many pixels", dict(messages=user(many_px)), "image_too_large", None),
        ("not an image", dict(messages=user(text)), "invalid_image", None),
        ("prompt too long", dict(messages=user(png_url(), text="dots " * 300)), "context_length_exceeded", "messages"),
        ("too many images", dict(messages=user(png_url(), png_url(), png_url())), "too_many_images", "messages"),
        ("path outside", dict(messages=user(str(root / "secret.png"))), "image_path_not_allowed", None),
        ("dotdot outside", dict(messages=user("../secret.png")), "image_path_not_allowed", None),
        ("symlink outside", dict(messages=user("link.png")), "image_path_not_allowed", None),
        ("remote url", dict(messages=user("http://example.com/a.png")), "invalid_image_url", None),
        ("two turns", dict(messages=user(png_url()) + [{"role": "assistant", "content": "x"}]),
         "unsupported_messages", "messages"),
        ("n=2", dict(messages=user(png_url()), n=2), "invalid_value", "n"),
        ("max_tokens over the limit", dict(messages=user(png_url()), max_tokens=257), "invalid_value", "max_tokens"),
    ]


@slow
def test_bad_requests_then_a_good_one(server):
    c = server["client"]
    for name, kw, code, param in _bad_requests(server["root"]):
        with pytest.raises(openai.BadRequestError) as e:
            ask(c, **kw)
        err = e.value.body
        assert e.value.status_code == 400 and err["code"] == code, (name, err)
        assert err["type"] == "invalid_request_error" and err["message"], name
        if param:
            assert err["param"] == param, (name, err)
        good(server)
    with pytest.raises(openai.NotFoundError):
        c.chat.completions.create(model="gpt-4o", messages=user(png_url()), max_tokens=4)
    good(server)


@slow
def test_malformed_json_and_non_object(server):
    url = f"http://127.0.0.1:{server['port']}/v1/chat/completions"
    for body in (b'{"model": "tiny", "messages": [', b"[1, 2]", b"\xff\xfe"):
        r = httpx.post(url, content=body, headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json", body
        good(server)
    r = httpx.get(f"http://127.0.0.1:{server['port']}/v1/nothing")
    assert r.status_code == 404 and set(r.json()["error"]) == {"message", "type", "param", "code"}


@slow
def test_client_disconnects_mid_stream(server):
    url = f"http://127.0.0.1:{server['port']}/v1/chat/completions"
    body = {"model": "tiny", "messages": user(png_url(seed=5)), "max_tokens": 256, "temperature": 0, "stream": True}
    with httpx.stream("POST", url, json=body, timeout=60) as r:
        assert r.status_code == 200
        first = next(r.iter_lines())
        assert first.startswith("data: ") and json.loads(first[6:])["choices"][0]["delta"]["role"] == "assistant"
    good(server)
    for _ in range(100):   # the abandoned row finishes and frees its place
        if httpx.get(f"http://127.0.0.1:{server['port']}/health").json()["pending"] == 0:
            break
        time.sleep(0.1)
    assert httpx.get(f"http://127.0.0.1:{server['port']}/health").json()["pending"] == 0


@slow
def test_full_queue_gets_429_then_serves(server):
    c, port = server["client"], server["port"]
    long = dict(messages=user(png_url(seed=5)), max_tokens=256)
    assert ask(c, **long).choices[0].finish_reason == "length"   # this prompt decodes all 256 steps
    results = []
    threads = [threading.Thread(target=lambda: results.append(ask(c, **long))) for _ in range(4)]
    for t in threads:
        t.start()
    for _ in range(2000):   # all four admitted (--max-pending 4)
        if httpx.get(f"http://127.0.0.1:{port}/health").json()["pending"] == 4:
            break
        time.sleep(0.005)
    with pytest.raises(openai.RateLimitError) as e:
        ask(c, user(png_url()))
    assert e.value.status_code == 429 and e.value.response.headers["retry-after"] == "1"
    assert e.value.body["code"] == "rate_limit_exceeded"
    for t in threads:
        t.join(120)
    assert len(results) == 4 and all(r.choices[0].finish_reason == "length" for r in results)
    good(server)


def test_bad_arguments_exit_2_with_one_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    run = lambda *a: subprocess.run([sys.executable, "-m", "infllava_jax.serve", *map(str, a)], cwd=ROOT, env=env,
                                    capture_output=True, text=True, timeout=300)
    r = run("--ckpt", tmp_path / "nothing", "--port", free_port())
    assert r.returncode == 2 and r.stderr.strip() == f"serve: error: --ckpt {tmp_path / 'nothing'}: no config.json " \
                                                     f"(not a checkpoint directory)"
    r = run("--ckpt", tmp_path, "--image-dir", tmp_path / "none", "--port", free_port())
    assert r.returncode == 2 and r.stderr.strip().endswith("none: not a directory")
    r = run("--ckpt", tmp_path, "--workers", -1, "--port", free_port())
    assert r.returncode == 2 and r.stderr.strip() == "serve: error: --workers -1: 0 (automatic) or more"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        r = run("--ckpt", tmp_path, "--port", s.getsockname()[1])
    assert r.returncode == 2 and "cannot listen there" in r.stderr and "Traceback" not in r.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_batch_waits_for_requests_still_being_prepared(monkeypatch):
    """The engine's batch former (no server): a request that is being prepared (images decoded,
    prompt tokenized) when the batch would close is waited for, up to batch_max_wait_s."""
    from infllava_jax import presets
    from infllava_jax.api import InfLlava
    from infllava_jax.evaluation.runner import Sampling
    from infllava_jax.serving.engine import Engine, Job, Limits
    from infllava_jax.serving.prompt import Prepared
    engine = Engine(InfLlava.init(presets.tiny(), tokenizer="tiny"),
                    limits=Limits(batch_sizes=(1, 4), batch_wait_s=0.02, batch_max_wait_s=5.0))
    ran = []
    monkeypatch.setattr(engine, "decode", lambda jobs: ran.append(len(jobs)) or [None] * len(jobs))
    job = lambda: Job(Prepared(np.array([1, 2], np.int32), [], ()), 4, Sampling(), bucket=4,
                      notify=lambda event: None)
    engine.start()
    try:
        with engine.arriving_request():
            engine.submit(job())
            time.sleep(0.3)            # far past batch_wait_s: the batch waits for this request
            assert ran == []
            engine.submit(job())
        for _ in range(500):
            if ran:
                break
            time.sleep(0.01)
        assert ran == [2]
        engine.submit(job())           # nothing arriving: closes after batch_wait_s, alone
        for _ in range(500):
            if len(ran) == 2:
                break
            time.sleep(0.01)
        assert ran == [2, 1] and engine.batch_sizes == {2: 1, 1: 1}
    finally:
        engine.close()
    assert engine._threads and not any(t.is_alive() for t in engine._threads)   # close() waits for the
    # workers: none left inside XLA at exit


def test_two_workers_decode_two_batches_at_once(monkeypatch):
    """Two workers (one device's default; refused on a multi-device mesh): while one batch decodes
    the next one is formed and decoded beside it; each request is in exactly one batch and no
    worker runs an empty one."""
    from infllava_jax import presets
    from infllava_jax.api import InfLlava
    from infllava_jax.evaluation.runner import Sampling
    from infllava_jax.serving.engine import Engine, Job, Limits
    from infllava_jax.serving.prompt import Prepared
    from infllava_jax.errors import InputError
    from infllava_jax.sharding import make_mesh
    model = InfLlava.init(presets.tiny(), tokenizer="tiny")
    assert Engine(model).workers == 1 and Engine(model, make_mesh("data=1")).workers == 2   # 8 devices here
    with pytest.raises(InputError, match="workers=2 on a mesh of 8 devices"):
        Engine(model, limits=Limits(workers=2))
    engine = Engine(model, make_mesh("data=1"), limits=Limits(batch_sizes=(1, 2), batch_wait_s=0.01, workers=2))
    running, most, lock, seen = [0], [0], threading.Lock(), []

    def decode(jobs):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
            seen.extend(jobs)
        time.sleep(0.3)                # a program running (XLA releases the GIL)
        with lock:
            running[0] -= 1
        return [None] * len(jobs)
    monkeypatch.setattr(engine, "decode", decode)
    jobs = [Job(Prepared(np.array([1, 2], np.int32), [], ()), 4, Sampling(), bucket=4, notify=lambda event: None)
            for _ in range(5)]
    engine.start()
    try:
        for j in jobs:
            engine.submit(j)
            time.sleep(0.02)
        for _ in range(500):
            if engine.pending == 0:
                break
            time.sleep(0.01)
    finally:
        engine.close()
    assert most[0] == 2 and sorted(map(id, seen)) == sorted(map(id, jobs))
    assert 0 not in engine.batch_sizes and sum(k * v for k, v in engine.batch_sizes.items()) == 5


def test_engine_answers_as_the_python_api():
    """The engine sends each image as its resized bytes and normalises inside the program; its
    tokens are those of `InfLlava.generate` on the host-normalised pixels, alone and in a batch."""
    from functools import partial
    from infllava_jax import presets
    from infllava_jax.api import InfLlava
    from infllava_jax.evaluation.runner import Sampling
    from infllava_jax.serving import images
    from infllava_jax.serving.engine import Engine, Limits
    from infllava_jax.serving.prompt import prepare
    from infllava_jax.serving.schema import ChatRequest
    from infllava_jax.sharding import make_mesh
    mesh = make_mesh("data=-1")
    model = InfLlava.init(presets.tiny(), mesh=mesh, tokenizer="tiny")
    engine = Engine(model, mesh, limits=Limits(batch_sizes=(1, 4), length_buckets=(64,), image_buckets=(1,),
                                         token_buckets=(8,)))
    load = partial(images.load_image_url, image_dir=None, max_bytes=1 << 20, max_pixels=1 << 20)
    urls = [png_url(seed=s) for s in range(3)]
    jobs = [engine.make_job(prepare(model, ChatRequest.model_validate({"messages": user(u)}).messages, load, 1),
                            8, Sampling()) for u in urls]
    assert jobs[0].prepared.images[0].dtype == np.uint8
    want = [model.generate(**model.prepare(load(u, "url"), QUESTION),
                           max_new_tokens=8)[0] for u in urls]
    assert [r.tokens for r in engine.decode(jobs)] == [[int(t) for t in w if t not in model.stop_ids] for w in want]
    assert engine.decode(jobs[1:2])[0].tokens == engine.decode(jobs)[1].tokens


@slow
@pytest.mark.parametrize("client,workers", [("http", 2), ("openai", 1)])   # one CPU device: 2 is allowed
def test_throughput_benchmark_runs_and_checks_its_answers(client, workers):
    """`python -m benchmarks.serve` as docs/serving.md runs it, small: both phases, every
    concurrent answer compared with its sequential one (exit 1 otherwise), the CPU accounting."""
    r = subprocess.run([sys.executable, "-m", "benchmarks.serve", "--requests", "6", "--clients", "3",
                        "--max-tokens", "4", "--client", client, "--workers", str(workers)], cwd=ROOT,
                       capture_output=True, text=True, timeout=900,
                       env={**{k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}, "JAX_PLATFORMS": "cpu"})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["same_answers"] == "6/6" and out["throughput_ratio"] > 0
    assert (out["client"], out["workers"]) == (client, workers)
    for phase in ("sequential", "concurrent"):
        p = out[phase]
        assert sum(int(k) * v for k, v in p["batches"].items()) == 6      # every request decoded once
        assert 0 < p["decoding"] <= 1 and p["server_cpu_ms"] > 0
        assert p["client_cpu_ms"] > 0 or client == "http"   # 6 light requests can stay under one 10 ms tick
