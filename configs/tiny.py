"""Tiny INF-LLaVA on CPU: the real pipeline end to end on a generated dataset, ~1 s per step.

    python train.py --config configs/tiny.py --workdir W              # stage 2 (default)
    python train.py --config configs/tiny.py:stage=1 --workdir W1     # stage 1
    python train.py --config configs/tiny.py:grid=0 --workdir W       # LLaVA-1.5 path (no DCM/DEM)
"""
import ml_collections

from infllava_jax.training.defaults import base_config, parse_arg


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    a = parse_arg(arg, stage=2, grid=3, variant="released", steps=60)
    c = base_config()
    c.stage = f"stage{a['stage']}"
    c.total_steps = a["steps"]
    c.log_every = 5
    c.checkpoint_every = 20
    c.keep_checkpoints = 2
    c.model = ml_collections.ConfigDict({"preset": "tiny", "grid": a["grid"], "variant": a["variant"]})
    c.data.synthetic = True         # generate the demo dataset into WORKDIR/synthetic_data if missing
    c.data.max_len = 256
    c.data.num_threads = 2
    c.global_batch = 8
    c.micro_batch = 4
    c.loss_chunk = 64
    c.optimizer.lr = 1e-3 if a["stage"] == 1 else 3e-4
    return c
