"""Peak memory and throughput of `python -m convert` on a checkpoint the size of INF-LLaVA-8B.

Writes a synthetic released INF-LLaVA checkpoint with the exact tensor names and shapes of
the 8B model (Llama-3-8B with the <pad> row + CLIP-L/14-336 + DEM + projector, bf16, sharded
safetensors + index, ~16.7 GB; values: a 64 MB block of N(0, 0.02) bf16 repeated, so the
compression in the output sees realistic data), converts it in a child process, and reports
that process' wall time, MB/s (checkpoint bytes / wall time, start-up included) and peak RSS
(ru_maxrss). Checks a few slices of the result against the source, exports it back to the
released layout (measured the same way; every tensor compared with the source), then deletes all.

    python -m benchmarks.convert_memory [--workdir DIR] [--keep]

Target on a 24 GiB machine: peak RSS <= checkpoint / 4, >= 150 MB/s. Also reported: the child's
CPU seconds (user + sys) and the machine's load average, since wall-clock MB/s on a shared
2-CPU box depends on what else runs. Last line: JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import zlib
from pathlib import Path

import ml_dtypes
import numpy as np
from flax.traverse_util import flatten_dict

from convert import formats
from convert.sources import Tensor, open_weights
from convert.writers import write_safetensors
from infllava_jax import presets
from infllava_jax.params import abstract_params

BF16 = np.dtype(ml_dtypes.bfloat16)
BLOCK = (np.random.default_rng(0).standard_normal(32 << 20, np.float32) * 0.02).astype(BF16)   # 64 MB


class Synthetic(Tensor):
    """A bf16 tensor whose flat contents are BLOCK repeated from a per-key offset."""

    def __init__(self, key: str, shape):
        self.shape, self.dtype, self.where = tuple(shape), BF16, "synthetic"
        self.offset = zlib.crc32(key.encode()) % BLOCK.size

    def read(self, index=None) -> np.ndarray:
        n_rows = self.shape[0] if self.shape else 1
        row = int(np.prod(self.shape[1:], dtype=np.int64)) if self.shape else 1
        a, b = (0, n_rows) if index is None else index[0].indices(n_rows)[:2]
        start, n = (self.offset + a * row) % BLOCK.size, (b - a) * row
        parts, got = [], 0
        while got < n:
            piece = BLOCK[start:start + n - got]
            parts.append(piece)
            got += piece.size
            start = 0
        return np.concatenate(parts).reshape((b - a,) + self.shape[1:]) if self.shape else parts[0].reshape(())


def released_8b_tensors() -> dict[str, Tensor]:
    config = presets.inf_llava_8b()
    specs = flatten_dict(abstract_params(config), sep="/")
    out = {}
    for r in formats.released_rows(config):
        for key in r.keys():
            out[key] = Synthetic(key, r.torch_shape(specs[r.path].shape))
    return out


def released_8b_config_json() -> dict:
    """What the released config.json holds (no fields of our export): the converter must
    work out CLIP-L/14-336 from mm_vision_tower and the DEM from the shapes."""
    c = presets.inf_llava_8b()
    d = c.llm.to_hf()
    d.update(model_type="llava_llama", architectures=["LlavaLlamaForCausalLM"], torch_dtype="bfloat16",
             mm_vision_tower=formats.CLIP_L14_336, mm_hidden_size=1024, mm_projector_type="mlp2x_gelu",
             mm_vision_select_layer=-2, mm_vision_select_feature="patch", image_aspect_ratio="pad",
             tokenizer_model_max_length=2048, pad_token_id=128256)
    return d


# runs the command as its only child, so ru_maxrss / CPU times are that command's alone
WRAPPER = """
import json, resource, subprocess, sys, time
t0 = time.perf_counter()
rc = subprocess.run(sys.argv[1:]).returncode
r = resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps({"rc": rc, "wall": time.perf_counter() - t0, "peak": r.ru_maxrss * 1024,
                  "user": r.ru_utime, "sys": r.ru_stime}))
"""


def measure(cmd: list[str]) -> dict:
    """Wall time, peak RSS (bytes) and CPU seconds of `cmd` (its stderr -- the progress bar -- passes through)."""
    print("$", " ".join(cmd), flush=True)
    load = os.getloadavg()[0]
    proc = subprocess.run([sys.executable, "-c", WRAPPER, *cmd], stdout=subprocess.PIPE, text=True,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"}, cwd=Path(__file__).resolve().parent.parent)
    lines = proc.stdout.strip().splitlines()
    print("\n".join(lines[:-1]))
    m = json.loads(lines[-1])
    if m["rc"] != 0:
        raise SystemExit(f"{cmd[2:4]} failed with exit code {m['rc']}")
    m["cpu"] = m["user"] + m["sys"]
    m["load"] = [round(load, 1), round(os.getloadavg()[0], 1)]
    return m


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="/tmp/convert_memory_bench")
    p.add_argument("--keep", action="store_true", help="keep the synthetic checkpoint and the output")
    args = p.parse_args(argv)
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    src, dst = work / "inf-llava-8b-synthetic", work / "converted"
    tensors = released_8b_tensors()
    ckpt_bytes = sum(t.nbytes for t in tensors.values())
    print(subprocess.run(["df", "-h", str(work)], capture_output=True, text=True).stdout.strip())
    need = 2.9 * ckpt_bytes   # source + converted (compressed) + exported
    if free_bytes(work) < need:
        raise SystemExit(f"need {need / 1e9:.0f} GB free in {work}, have {free_bytes(work) / 1e9:.0f} GB")
    try:
        if not (src / "model.safetensors.index.json").is_file():
            shutil.rmtree(src, ignore_errors=True)
            src.mkdir()
            t0 = time.perf_counter()
            write_safetensors(tensors, src)
            (src / "config.json").write_text(json.dumps(released_8b_config_json(), indent=2))
            print(f"wrote synthetic checkpoint {src}: {len(tensors)} tensors, {ckpt_bytes / 1e9:.2f} GB, "
                  f"{len(list(src.glob('*.safetensors')))} shards, {time.perf_counter() - t0:.0f} s")
        shutil.rmtree(dst, ignore_errors=True)
        os.sync()
        try:   # cold page cache, if allowed (the source would otherwise be read from RAM)
            Path("/proc/sys/vm/drop_caches").write_text("1\n")
            cache = "dropped"
        except OSError:
            cache = "not dropped (no permission)"
        print(f"page cache: {cache}")

        conv = measure([sys.executable, "-m", "convert", str(src), str(dst)])
        out_bytes = sum(f.stat().st_size for f in dst.rglob("*") if f.is_file())

        # spot-check the result against the source (a stacked layer slice, the grown vocab rows, a transpose)
        from convert.export import open_checkpoint
        _, ours = open_checkpoint(dst)
        src_t = open_weights(src)   # (also used by the export check below)
        checks = [("language_model/model/layers/mlp/gate_proj/kernel", (slice(7, 8),),
                   lambda: src_t["model.layers.7.mlp.gate_proj.weight"].read().T[None]),
                  ("language_model/lm_head/kernel", (slice(None), slice(128250, 128257)),
                   lambda: src_t["lm_head.weight"].read((slice(128250, 128257),)).T),
                  ("vision_tower/embeddings/patch_embedding/kernel", None,
                   lambda: src_t[formats.RELEASED_VISION_PREFIX + "embeddings.patch_embedding.weight"].read()
                   .transpose(2, 3, 1, 0))]
        for path, index, want in checks:
            got = ours[path].read(index)
            if not np.array_equal(got.view(np.uint16), np.ascontiguousarray(want()).view(np.uint16)):
                raise SystemExit(f"converted {path} differs from the source")
        # and back to the released layout (every tensor compared with the source)
        back = work / "exported"
        shutil.rmtree(back, ignore_errors=True)
        exp = measure([sys.executable, "-m", "convert.export", str(dst), str(back)])
        again = open_weights(back)
        if sorted(again) != sorted(src_t) or any(
                (again[k].dtype, again[k].shape) != (src_t[k].dtype, src_t[k].shape)
                or again[k].read().tobytes() != src_t[k].read().tobytes() for k in src_t):
            raise SystemExit("export differs from the source")
        shutil.rmtree(back, ignore_errors=True)

        result = {"ckpt_bytes": ckpt_bytes, "tensors": len(tensors), "wall_s": round(conv["wall"], 1),
                  "mb_per_s": round(ckpt_bytes / 1e6 / conv["wall"], 1), "peak_rss_bytes": conv["peak"],
                  "peak_rss_over_ckpt_bytes": round(conv["peak"] / ckpt_bytes, 4), "output_bytes": out_bytes,
                  "cpu_s": round(conv["cpu"], 1), "sys_cpu_s": round(conv["sys"], 1),
                  "mb_per_cpu_s": round(ckpt_bytes / 1e6 / conv["cpu"], 1), "cpus": os.cpu_count(),
                  "load_avg_1min_before_after": conv["load"],
                  "export": {"wall_s": round(exp["wall"], 1), "mb_per_s": round(ckpt_bytes / 1e6 / exp["wall"], 1),
                             "peak_rss_bytes": exp["peak"], "peak_rss_over_ckpt_bytes": round(exp["peak"] / ckpt_bytes, 4),
                             "cpu_s": round(exp["cpu"], 1), "load_avg_1min_before_after": exp["load"],
                             "round_trip": f"bit-identical: all {len(again)} tensors, same keys/dtypes/shapes"},
                  "page_cache": cache, "spot_checks": "ok",
                  "target": {"peak_rss_over_ckpt_bytes": 0.25, "mb_per_s": 150}}
        print(f"convert: {ckpt_bytes / 1e9:.2f} GB -> {out_bytes / 1e9:.2f} GB in {conv['wall']:.1f} s "
              f"({result['mb_per_s']} MB/s); peak RSS {conv['peak'] / 2**30:.2f} GiB = "
              f"{100 * result['peak_rss_over_ckpt_bytes']:.1f}% of the checkpoint; {conv['cpu']:.0f} CPU-s "
              f"({result['mb_per_cpu_s']} MB per CPU-s; load {conv['load']} on {os.cpu_count()} CPUs)")
        print(f"export:  {exp['wall']:.1f} s ({result['export']['mb_per_s']} MB/s); peak RSS {exp['peak'] / 2**30:.2f} GiB")
        print(json.dumps(result))
        return result
    finally:
        if not args.keep:
            for d in (src, dst, work / "exported"):
                shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
