"""Serve a checkpoint over an OpenAI-compatible HTTP API (docs/serving.md).

    python -m infllava_jax.serve --ckpt DIR [--mesh data=-1] [--host 127.0.0.1] [--port 8000] [--image-dir DIR]
                                 [--quant int8|int4]

`POST /v1/chat/completions` (messages with text and image_url parts, max_tokens, temperature,
top_p, stop, seed, stream), `GET /v1/models`, `GET /health`. Requests that arrive together are
decoded together (serving/engine.py); every program is compiled before the server listens.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def int_list(s: str) -> tuple[int, ...]:
    try:
        vals = tuple(int(v) for v in s.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r}: expected comma-separated positive integers") from None
    if not vals or min(vals) < 1:
        raise argparse.ArgumentTypeError(f"{s!r}: expected comma-separated positive integers")
    return tuple(sorted(set(vals)))


def add_model_args(p: argparse.ArgumentParser) -> None:
    """What serve and predict share: the checkpoint, its devices, the shape buckets."""
    p.add_argument("--ckpt", required=True, help="checkpoint directory (config.json + params/)")
    p.add_argument("--tokenizer", default="", help='"" = the checkpoint\'s, "tiny", or a tokenizer directory')
    p.add_argument("--mesh", default="data=-1", help="device mesh, e.g. data=-1 or data=2,fsdp=4 (sharding.py)")
    p.add_argument("--quant", default="", help='"" = as saved; "int8" | "int4" (optionally /TILE): the language '
                                               'model\'s weights quantized at load (quant.py)')
    p.add_argument("--image-dir", type=Path, default=None,
                   help="image_url paths are allowed only inside this directory (default: none allowed)")
    p.add_argument("--length-buckets", type=int_list, default=(256, 1024), help="prompt lengths (ids) compiled")
    p.add_argument("--image-buckets", type=int_list, default=(1, 4), help="images per request compiled (max = limit)")
    p.add_argument("--max-tokens-buckets", type=int_list, default=(64, 512),
                   help="new-token counts compiled (max = the max_tokens limit and its default)")
    p.add_argument("--max-image-pixels", type=int, default=1 << 24, help="larger images are refused before decoding")
    p.add_argument("--max-image-bytes", type=int, default=16 << 20, help="larger encoded images are refused")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m infllava_jax.serve", description=__doc__.split("\n")[0])
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model-name", default="", help="the id clients pass as `model` (default: the checkpoint's name)")
    p.add_argument("--batch-sizes", type=int_list, default=(1, 4, 16), help="batch sizes compiled (max = batch limit)")
    p.add_argument("--batch-wait-ms", type=float, default=10.0, help="how long a batch waits to fill")
    p.add_argument("--batch-max-wait-ms", type=float, default=250.0,
                   help="how long it waits at most while received requests are still being prepared")
    p.add_argument("--workers", type=int, default=0, help="batches decoding at once (0: 2 on a one-device mesh, "
                                                          "where one program's serial steps leave cores idle; else 1)")
    p.add_argument("--max-pending", type=int, default=64, help="requests waiting or decoding; more get 429")
    p.add_argument("--max-body-bytes", type=int, default=32 << 20)
    a = p.parse_args(argv)
    from infllava_jax.errors import InputError, one_line
    try:
        if a.image_dir is not None and not a.image_dir.is_dir():
            raise InputError(f"--image-dir {a.image_dir}: not a directory")
        if a.workers < 0:
            raise InputError(f"--workers {a.workers}: 0 (automatic) or more")
        _check_port(a.host, a.port)   # before minutes of compiling
        engine = load_engine(a, batch_sizes=a.batch_sizes, batch_wait_s=a.batch_wait_ms / 1000,
                             batch_max_wait_s=a.batch_max_wait_ms / 1000,
                             max_pending=a.max_pending, workers=a.workers)
        name = a.model_name or Path(a.ckpt).resolve().name
    except InputError as e:
        print(f"serve: error: {one_line(e, 1000)}", file=sys.stderr)
        return 2
    n = engine.warmup(lambda s: print(s, file=sys.stderr, flush=True))
    print(f"serve: {n} programs compiled; model {name!r} on http://{a.host}:{a.port}", file=sys.stderr, flush=True)
    import uvicorn
    from infllava_jax.serving.app import create_app
    app = create_app(engine, name, image_dir=a.image_dir, max_body_bytes=a.max_body_bytes,
                     max_image_bytes=a.max_image_bytes, max_image_pixels=a.max_image_pixels)
    engine.start()
    try:
        uvicorn.run(app, host=a.host, port=a.port, log_level="warning", timeout_graceful_shutdown=5)
    finally:
        engine.close()
    return 0


def _check_port(host: str, port: int) -> None:
    import socket
    from infllava_jax.errors import InputError
    try:
        with socket.create_server((host, port)):
            pass
    except OSError as e:
        raise InputError(f"--host {host} --port {port}: cannot listen there ({e.strerror})") from None


def load_engine(a, **limits):
    """The checkpoint (InputError for a missing or broken one) and its engine; `limits` as
    engine.Limits takes them (batch sizes, waiting)."""
    from infllava_jax.errors import InputError
    if a.quant:
        from infllava_jax import quant
        try:
            quant.parse(a.quant)
        except ValueError as e:
            raise InputError(f"--quant {a.quant}: {e}") from None
    if not (Path(a.ckpt) / "config.json").is_file():
        raise InputError(f"--ckpt {a.ckpt}: no config.json (not a checkpoint directory)")
    from infllava_jax import sharding
    from infllava_jax.api import InfLlava
    from infllava_jax.serving.engine import Engine, Limits
    try:
        mesh = sharding.make_mesh(a.mesh)
    except ValueError as e:
        raise InputError(f"--mesh {a.mesh}: {e}") from None
    model = InfLlava.from_pretrained(a.ckpt, mesh=mesh, tokenizer=a.tokenizer or None, quant=a.quant or None)
    model.stop_ids   # the tokenizer and stop ids now: a missing tokenizer is an error here, not per request
    lim = Limits(length_buckets=a.length_buckets, image_buckets=a.image_buckets,
                 token_buckets=a.max_tokens_buckets, **limits)
    return Engine(model, mesh, lim)


if __name__ == "__main__":
    sys.exit(main())
