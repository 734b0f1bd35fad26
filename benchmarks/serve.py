"""Serving throughput: sequential requests against concurrent clients, one server, one run.

Starts `python -m infllava_jax.serve` on 127.0.0.1 (batch sizes 1, 4 and half the clients, so
one batch's requests are prepared while the other batch decodes; a prompt bucket of 64 ids;
--workers batches decoding at once; every program compiled before it listens), then sends the
same --requests chat requests (distinct random images and questions, greedy,
max_tokens=--max-tokens) twice: one after another from one client, then from --clients
concurrent clients (threads; --client http: one keep-alive stdlib connection each, posting the
body the `openai` client posts; --client openai: that client). Reports requests/s, generated
tokens/s, p50/p99 latency of each, the share of the wall the server had a batch decoding, the
CPU time per request of the server and of the clients (this process), the throughput ratio, and
whether every concurrent answer equals its sequential (greedy) answer. Without --ckpt it uses a
random tiny checkpoint (presets.tiny()). On a machine shared with other jobs, --nice -15 (root
only) raises the priority of the server's and the clients' threads once the server is up
(compiling runs at normal priority), so both phases measure the server rather than the
neighbours; the load average is reported.

    python -m benchmarks.serve [--ckpt DIR] [--requests 48] [--clients 16] [--max-tokens 32]
        [--batch-sizes 1,4,8] [--length-buckets 64] [--workers 0] [--client http] [--nice -15]

Last line: JSON; exit 1 if a concurrent answer differs from its sequential one.
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

QUESTIONS = ("What is in the image?", "Describe the image.", "What digit is written in the box?",
             "How many dots are inside the circle?", "Which corner holds the tiny x?",
             "Is the box left or right of the circle?")


def _messages(i: int) -> list:
    from PIL import Image
    rng = np.random.default_rng(i)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (64, 80, 3), dtype=np.uint8)).save(buf, "PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": QUESTIONS[i % len(QUESTIONS)]}]}]


def _start(ckpt: Path, a, log) -> tuple[subprocess.Popen, int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "infllava_jax.serve", "--ckpt", str(ckpt), "--port", str(port), "--model-name", "m",
           "--batch-sizes", a.batch_sizes or f"1,4,{max(4, a.clients // 2)}", "--length-buckets", a.length_buckets,
           "--workers", str(a.workers),
           "--image-buckets", "1", "--max-tokens-buckets", str(a.max_tokens), "--max-pending", str(4 * a.clients)]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    import httpx2 as httpx
    for _ in range(1800):   # bounded: 30 min of compiling on a loaded machine
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}; see {log.name}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc, port
        except httpx.TransportError:
            time.sleep(1)
    raise SystemExit("server not ready")


def _renice(pid: int, nice: int) -> None:
    """Every thread of a process (Linux niceness is per thread)."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        os.setpriority(os.PRIO_PROCESS, int(tid), nice)


def _health(port: int) -> dict:
    import httpx2 as httpx
    return httpx.get(f"http://127.0.0.1:{port}/health", timeout=10).json()


def _cpu_s(pid: int) -> float:
    """CPU seconds (user + system) a process has used, all its threads (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _http_client(port: int):
    """One keep-alive HTTP/1.1 connection (the standard library's) posting the JSON body the
    `openai` client posts; on 2 cores shared with the server, a lighter client leaves more of
    them to the server it measures."""
    import http.client
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)

    def ask(messages, max_tokens):
        body = json.dumps({"model": "m", "messages": messages, "max_tokens": max_tokens, "temperature": 0})
        conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
        r = conn.getresponse()
        data = r.read()
        if r.status != 200:
            raise RuntimeError(f"HTTP {r.status}: {data[:500]!r}")
        out = json.loads(data)
        return out["choices"][0]["message"]["content"], out["usage"]["completion_tokens"]
    return ask


def _openai_client(port: int):
    import openai
    c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=600)

    def ask(messages, max_tokens):
        r = c.chat.completions.create(model="m", messages=messages, max_tokens=max_tokens, temperature=0)
        return r.choices[0].message.content, r.usage.completion_tokens
    return ask


def _phase(port: int, server_pid: int, requests: list, clients: int, max_tokens: int, client_kind: str) -> dict:
    """Send every request once from `clients` threads, one client each (made before the clock
    starts); answers, latencies, wall time, the batches the server ran for them ({rows: count})
    and the share of the wall it spent decoding."""
    before = _health(port)
    answers, latency, tokens, lock, nxt = [None] * len(requests), [0.0] * len(requests), [0] * len(requests), \
        threading.Lock(), iter(range(len(requests)))
    made = [(_http_client if client_kind == "http" else _openai_client)(port) for _ in range(clients)]

    def client(ask):
        while True:
            with lock:
                i = next(nxt, None)
            if i is None:
                return
            t = time.perf_counter()
            answers[i], tokens[i] = ask(requests[i], max_tokens)
            latency[i] = time.perf_counter() - t

    t0, cpu0 = time.perf_counter(), (_cpu_s(server_pid), _cpu_s(os.getpid()))
    threads = [threading.Thread(target=client, args=(c,)) for c in made]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall, cpu = time.perf_counter() - t0, (_cpu_s(server_pid) - cpu0[0], _cpu_s(os.getpid()) - cpu0[1])
    after = _health(port)
    batches = {k: v - before["batches"].get(k, 0) for k, v in after["batches"].items()
               if v != before["batches"].get(k, 0)}
    return {"clients": clients, "batches": batches, "decoding": (after["busy_s"] - before["busy_s"]) / wall,
            "server_cpu_ms": 1e3 * cpu[0] / len(requests), "client_cpu_ms": 1e3 * cpu[1] / len(requests),
            "requests_per_s": len(requests) / wall, "tokens_per_s": sum(tokens) / wall,
            "p50_s": float(np.percentile(latency, 50)), "p99_s": float(np.percentile(latency, 99)),
            "wall_s": wall, "answers": answers}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", default="", help="a checkpoint directory (default: a random tiny one)")
    p.add_argument("--requests", type=int, default=48)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--batch-sizes", default="", help='the server\'s --batch-sizes ("": 1,4,CLIENTS/2: one batch is prepared while the other decodes)')
    p.add_argument("--length-buckets", default="64", help="the server's --length-buckets (prompt ids)")
    p.add_argument("--workers", type=int, default=0,
                   help="the server's --workers (batches decoding at once; 0: its default, 2 on one device)")
    p.add_argument("--client", choices=("http", "openai"), default="http",
                   help="http: one stdlib keep-alive connection per client thread; openai: the openai package's client")
    p.add_argument("--nice", type=int, default=0, help="niceness of server and clients while measuring")
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(a.ckpt) if a.ckpt else Path(tmp) / "tiny-random"
        if not a.ckpt:
            from infllava_jax import presets
            from infllava_jax.api import InfLlava
            InfLlava.init(presets.tiny(), tokenizer="tiny").save_pretrained(ckpt)
        requests = [_messages(i) for i in range(a.requests)]
        with open(Path(tmp) / "server.log", "w") as log:
            t = time.perf_counter()
            proc, port = _start(ckpt, a, log)
            startup = time.perf_counter() - t
            try:
                if a.nice:
                    _renice(proc.pid, a.nice)
                    _renice(os.getpid(), a.nice)   # the client threads start after this
                seq = _phase(port, proc.pid, requests, 1, a.max_tokens, a.client)
                conc = _phase(port, proc.pid, requests, a.clients, a.max_tokens, a.client)
            finally:
                proc.terminate()
                proc.wait(60)
    same = sum(x == y for x, y in zip(seq.pop("answers"), conc.pop("answers")))
    out = {"ckpt": a.ckpt or "random tiny (presets.tiny())", "requests": a.requests, "max_tokens": a.max_tokens,
           "client": a.client, "workers": a.workers, "startup_s": round(startup, 1), "sequential": seq, "concurrent": conc,
           "throughput_ratio": conc["requests_per_s"] / seq["requests_per_s"], "same_answers": f"{same}/{a.requests}",
           "cpus": os.cpu_count(), "nice": a.nice, "load_avg_1min": os.getloadavg()[0]}
    print(f"{'':<22}{'requests/s':>12}{'tokens/s':>12}{'p50 s':>9}{'p99 s':>9}{'decoding':>10}"
          f"{'CPU ms/req':>18}  batches run (rows: count)")
    for name, r in (("sequential (1 client)", seq), (f"{a.clients} clients", conc)):
        cpu = f"{r['server_cpu_ms']:.1f} + {r['client_cpu_ms']:.1f}"
        print(f"{name:<22}{r['requests_per_s']:>12.2f}{r['tokens_per_s']:>12.1f}{r['p50_s']:>9.3f}{r['p99_s']:>9.3f}"
              f"{r['decoding']:>10.0%}{cpu:>18}  {r['batches']}")
    print(f"throughput ratio {out['throughput_ratio']:.2f}x; answers equal to sequential greedy: {out['same_answers']}; "
          f"server start-up (compiling) {startup:.0f} s; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cpus")
    print(json.dumps(out))
    return 0 if same == a.requests else 1


if __name__ == "__main__":
    sys.exit(main())
