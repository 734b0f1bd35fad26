"""The training config's defaults: every key train.py reads (configs/<name>.py start from
`base_config()` and change what differs), the `name.py:k=v,k2=v2` argument parser the config
files share (big_vision style), and the check of every value (`check`, run by train.py and plan
before anything is created). docs/configuration.md lists the fields."""
from ml_collections import ConfigDict

from infllava_jax import overrides, presets
from infllava_jax.attention import IMPLS
from infllava_jax.data import config as data_config
from infllava_jax.data.images import MODES
from infllava_jax.data.template import TEMPLATES
from infllava_jax.layers import LAYER_LOOPS, REMAT_POLICIES
from infllava_jax.training import step as step_parts


def base_config() -> ConfigDict:
    """Every key of a training config with its default; configs/<name>.py change what differs."""
    c = ConfigDict()
    c.stage = "stage2"              # "stage1" | "stage2": template and trainable parts (docs/model.md section 7)
    c.also_train = ()               # parts that train beyond the stage's, e.g. ("vision_tower",)
    c.seed = 0
    c.total_steps = 1000
    c.global_batch = 128
    c.micro_batch = 32              # per process: global_batch / (micro_batch x processes) accumulations
    c.log_every = 10
    c.checkpoint_every = 500
    c.keep_checkpoints = 3
    c.mesh = {"data": 1, "fsdp": -1, "tensor": 1}     # -1: all remaining devices

    c.init_checkpoint = ""          # our checkpoint dir (python -m convert / a stage-1 export)
    c.init_vision_tower = ""        # a checkpoint whose vision tower replaces the initial one
    c.model = ConfigDict({"preset": "tiny"})   # without init_checkpoint: presets.<preset>(**the rest)
    # layer_loop "auto": stacked layers run unrolled on CPU, as a scan elsewhere (layers.unroll_layers)
    c.runtime = ConfigDict({"dtype": "float32", "remat_policy": "none", "scan_layers": True,
                            "layer_loop": "auto", "attention_impl": "xla"})  # InfLlavaConfig.with_runtime
    c.tokenizer = ""                # HF tokenizer dir; "" = the built-in tiny BPE

    # every DataConfig field a run does not derive (data/config.py; docs/configuration.md), plus two
    c.data = ConfigDict(data_config.training_defaults())
    c.data.synthetic = False        # path "": generate the demo dataset into WORKDIR/synthetic_data
    c.data.feature_bank = False     # True (frozen tower only): its features of every image computed once
                                    # and fed instead of pixels (training/feature_bank.py; small image sets)

    # LoRA on the language model (infllava_jax/lora.py): rank 0 = off (the stage trains the LLM in
    # full); rank > 0 freezes the LLM base and trains adapters on `targets`. WORKDIR/final is
    # always merged; export="adapters" also writes WORKDIR/final_lora (PEFT + LLaVA files).
    # quant="int4" | "int8" (QLoRA): the frozen base's projections quantized with qwix (quant.py).
    c.lora = ConfigDict({"rank": 0, "alpha": 16.0, "dropout": 0.0, "quant": "",
                         "targets": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
                         "export": "merged"})

    c.loss_chunk = 512
    c.loss_positions = 0            # > 0: the LM head only at the first K supervised positions of a row (loss.py)
    c.optimizer = ConfigDict({"lr": 2e-5, "warmup_ratio": 0.03, "weight_decay": 0.0, "max_grad_norm": 1.0})
    # a part's learning rate = lr x its factor (e.g. --config.optimizer.lr_mult.spatial_embed=3)
    c.optimizer.lr_mult = ConfigDict({p: 1.0 for p in step_parts.PARTS})
    c.eval_every = 0                # > 0: score eval_config on eval_data every N steps (in-memory params)
    c.eval_config = "tasks=pope,res=1008,limit=64"   # configs/eval.py arguments
    c.eval_data = ""                # directory of the eval tasks' local files
    c.compilation_cache_dir = ""    # "" = ~/.cache/infllava_jax/xla
    c.export_final = True           # write WORKDIR/final (our checkpoint) at the end
    c.preemption_signal = "SIGUSR1"  # besides SIGTERM and Ctrl-C: stop at the next step with a checkpoint
                                    # ("" = none; docs/preemption.md, training/preemption.py)
    return c


def parse_arg(arg: str | None, **defaults) -> dict:
    """A config file's 'a=1,b=x' argument -> {'a': 1, 'b': 'x'} over `defaults` (overrides.parse_arg)."""
    return overrides.parse_arg(arg, **defaults)


def check(cfg: ConfigDict, batches: bool = True) -> None:
    """Every value of a training config in its accepted set or range, before anything runs;
    overrides.ConfigError names the first one that is not. `batches`: also global_batch a
    multiple of micro_batch (plan sets its own micro-batch)."""
    overrides.check(cfg, RULES)
    if batches and cfg.global_batch % cfg.micro_batch:
        raise overrides.ConfigError(f"config.global_batch={cfg.global_batch} is not a multiple of "
                                    f"config.micro_batch={cfg.micro_batch} (x processes x accumulation steps)")
    section = data_config.from_training(dict(cfg.data))
    try:    # the data section's own checks, on a stand-in data path and model
        data_config.DataConfig(**{"data_path": "-", "tokens_per_image": 1, **section})
    except ValueError as e:
        raise overrides.ConfigError(f"config.data.{e}") from None
    from infllava_jax.evaluation.config import get_config
    try:
        get_config(cfg.eval_config)
    except overrides.ConfigError as e:
        raise overrides.ConfigError(f"config.eval_config: {e}") from None


def _mesh(shape) -> str | None:
    bad = {k: v for k, v in dict(shape).items() if not isinstance(v, int) or (v < 1 and v != -1)}
    if bad or list(dict(shape).values()).count(-1) > 1:
        return "expected axis sizes >= 1, and at most one -1 (the remaining devices)"
    return None


def _parts(parts) -> str | None:
    unknown = [p for p in parts if p not in step_parts.PARTS]
    return f"unknown parts {unknown}; accepted: {', '.join(step_parts.PARTS)}" if unknown else None


def _presets(name) -> str | None:
    names = [n for n, f in vars(presets).items() if callable(f) and getattr(f, "__module__", "") == presets.__name__
             and not n.startswith("_")]
    return None if name in names else f"accepted: {', '.join(names)}{overrides.did_you_mean(name, names)}"


RULES = {
    "stage": ("stage1", "stage2"), "also_train": _parts, "mesh": _mesh, "model.preset": _presets,
    **{k: [1, None] for k in ("total_steps", "global_batch", "micro_batch", "log_every", "checkpoint_every",
                              "keep_checkpoints", "loss_chunk")},
    "eval_every": [0, None], "seed": [0, None], "loss_positions": [0, None],
    "runtime.dtype": ("float32", "bfloat16", "float16"), "runtime.remat_policy": tuple(REMAT_POLICIES),
    "runtime.layer_loop": LAYER_LOOPS, "runtime.attention_impl": IMPLS,
    "data.template": ("", *TEMPLATES), "data.image_mode": ("", *MODES),
    "lora.rank": [0, None], "lora.alpha": [0, None], "lora.dropout": [0, 1], "lora.export": ("merged", "adapters"),
    "lora.quant": ("", "int8", "int4"),
    "optimizer.lr": [0, None], "optimizer.warmup_ratio": [0, 1], "optimizer.weight_decay": [0, None],
    "optimizer.max_grad_norm": [0, None], **{f"optimizer.lr_mult.{p}": [0, None] for p in step_parts.PARTS},
}
