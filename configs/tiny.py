"""Tiny INF-LLaVA on CPU: the real pipeline end to end on a generated dataset, ~1 s per step.

    python train.py --config configs/tiny.py --workdir W              # stage 2 (default)
    python train.py --config configs/tiny.py:stage=1 --workdir W1     # stage 1
    python train.py --config configs/tiny.py:grid=0 --workdir W       # LLaVA-1.5 path (no DCM/DEM)
"""
import ml_collections

from configs.common import parse_arg


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    a = parse_arg(arg, stage=2, grid=3, variant="released", steps=60)
    c = ml_collections.ConfigDict()
    c.stage = f"stage{a['stage']}"
    c.seed = 0
    c.total_steps = a["steps"]
    c.log_every = 5
    c.checkpoint_every = 20
    c.keep_checkpoints = 2
    c.mesh = {"data": 1, "fsdp": -1, "tensor": 1}     # -1: all remaining devices

    c.also_train = ""               # "+"-joined parts that train beyond the stage's, e.g. "vision_tower"
    c.init_checkpoint = ""          # our checkpoint dir (python -m convert / a stage-1 export)
    c.init_vision_tower = ""        # a checkpoint whose vision tower replaces the initial one (study stage 0)
    c.model = ml_collections.ConfigDict({"preset": "tiny", "grid": a["grid"], "variant": a["variant"]})
    c.runtime = ml_collections.ConfigDict({"dtype": "float32", "remat_policy": "none", "scan_layers": True,
                                           "attention_impl": "xla"})
    c.tokenizer = ""                # HF tokenizer dir; "" = the built-in tiny BPE

    c.data = ml_collections.ConfigDict()
    c.data.synthetic = True         # generate the demo dataset into WORKDIR/../data if missing
    c.data.path = ""                # LLaVA JSON (or ArrayRecord dir); "" with synthetic: generated
    c.data.image_folder = ""
    c.data.max_len = 256
    c.data.buckets = ()             # spliced lengths to pad to; () = max_len / 4, / 2, 3/4, 1
    c.data.num_threads = 2
    c.data.image_cache_mb = 0       # > 0: decoded images stay in memory (the study's rows share them)

    c.global_batch = 8
    c.micro_batch = 4               # per step: global_batch / (micro_batch * processes) accumulations
    c.loss_chunk = 64

    c.optimizer = ml_collections.ConfigDict({"lr": 1e-3 if a["stage"] == 1 else 3e-4, "warmup_ratio": 0.03,
                                             "weight_decay": 0.0, "max_grad_norm": 1.0})
    c.eval_every = 0                # > 0: score eval_config on eval_data every N steps (in-memory params)
    c.eval_config = "tasks=pope,res=1008,limit=64"   # configs/eval.py arguments
    c.eval_data = ""                # directory of the eval tasks' local files
    c.compilation_cache_dir = ""    # "" = ~/.cache/infllava_jax/xla
    c.export_final = True           # write WORKDIR/final (our checkpoint) at the end
    return c
