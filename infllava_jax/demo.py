"""The built-in small default job: a tiny INF-LLaVA end to end on the bundled image.

    python -m infllava_jax.demo [--grid 3] [--max-new-tokens 16] [--out DIR]

Builds a tiny model of the released structure (random weights; no download), preprocesses the
bundled astronaut photo as the released pipeline does, checks that the exact fast path (only the
sub-images that reach the output) equals the full DCM + DEM computation, runs the forward pass
in both pixel modes (high-res input, and low-res input upsampled inside the model), saves and
reloads the checkpoint onto a mesh, and generates greedily with the llama3 template.
The weights are random, so the generated text is noise: the job shows the machinery, timed.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

ASSET = Path(__file__).parent / "assets" / "astronaut.jpg"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--grid", type=int, default=3, help="n x n sub-images (released: 3)")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--devices", type=int, default=8, help="fake CPU devices for the mesh")
    ap.add_argument("--out", default=None, help="where to save the tiny checkpoint (default: a temp dir)")
    args = ap.parse_args(argv)
    os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count={args.devices}")

    import jax
    import numpy as np
    from PIL import Image

    from infllava_jax import InfLlava, presets
    from infllava_jax.data.tokenizer import build_tiny_tokenizer
    from infllava_jax.evaluation.prompting import encode
    from infllava_jax.pixels import preprocess

    print(f"infllava-jax demo: jax {jax.__version__}, {jax.device_count()} {jax.default_backend()} devices")
    t = time.perf_counter()
    tok = build_tiny_tokenizer()
    config = presets.tiny(grid=args.grid, vocab_size=len(tok))
    model = InfLlava.init(config, seed=0)
    n_params = sum(x.size for x in jax.tree.leaves(model.params))
    d = config.dem
    step(f"tiny model: {n_params / 1e6:.2f} M params, grid {d.nH}x{d.nW}, "
         f"{config.tokens_per_image} tokens/image", t)

    t = time.perf_counter()
    s, (H, W) = config.sub_image_size, config.image_size
    image = Image.open(ASSET)
    hi = preprocess(image, size=H, mode="pad")            # (H, W, 3), the training-time input
    lo = preprocess(image, size=s, mode="pad")            # (s, s, 3), the released inference input
    ids = encode(tok, "What is the person in the picture wearing?", 1)[None]
    step(f"image {image.size} -> {H}x{W} and {s}x{s}; prompt {ids.shape[1]} ids", t)

    t = time.perf_counter()
    full = InfLlava(config.replace(dem=d.__class__(**{**d.__dict__, "fast_path": False})), model.params)
    px = np.moveaxis(hi, -1, 0)[None]
    logits = model(ids, px)
    err = np.abs(full(ids, px) - logits).max() / np.abs(logits).max()
    step(f"fast path ({d.vit_passes()} ViT passes) vs full ({d.vit_passes(False)}): rel err {err:.1e}", t)
    if err > 1e-4:
        raise SystemExit(f"fast path disagrees with the full computation: {err:.2e}")

    t = time.perf_counter()
    logits_lo = model(ids, np.moveaxis(lo, -1, 0)[None])
    step(f"logits {logits.shape} (hi-res) and {logits_lo.shape} (low-res, upsampled)", t)

    reload_and_generate(model, tok, ids, px, logits, args)
    print("demo: OK")
    return 0


def reload_and_generate(model, tok, ids, px, logits, args) -> None:
    import jax
    import numpy as np

    from infllava_jax import InfLlava
    from infllava_jax.conversation import stop_ids
    from infllava_jax.sharding import make_mesh

    t = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(args.out or Path(tmp) / "tiny_ckpt")
        model.save_pretrained(ckpt)
        mesh = make_mesh({"fsdp": jax.device_count()})
        reloaded = InfLlava.from_pretrained(ckpt, mesh=mesh)
        err = np.abs(reloaded(ids, px) - logits).max() / np.abs(logits).max()
    step(f"save -> from_pretrained on mesh fsdp={jax.device_count()}: rel err {err:.1e}", t)

    t = time.perf_counter()
    out = model.generate(ids, px, max_new_tokens=args.max_new_tokens, stop_ids=stop_ids(model.usage, tok))[0]
    step(f"greedy generation: {len(out)} tokens", t)
    print(f"  answer (random weights): {tok.decode(out, skip_special_tokens=True)!r}")


def step(msg, t0):
    print(f"  {msg:<58s} {time.perf_counter() - t0:6.2f} s", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
