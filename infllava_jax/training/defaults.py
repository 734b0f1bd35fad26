"""The training config's defaults: every key train.py reads (configs/<name>.py start from
`base_config()` and change what differs), and the `name.py:k=v,k2=v2` argument parser the config
files share (big_vision style)."""
from ml_collections import ConfigDict


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

    c.data = ConfigDict()
    c.data.synthetic = False        # generate the demo dataset into WORKDIR/../data if path is ""
    c.data.path = ""                # LLaVA JSON (or ArrayRecord dir)
    c.data.image_folder = ""
    c.data.max_len = 2048           # after splicing (docs/model.md §6)
    c.data.buckets = ()             # spliced lengths to pad to; () = max_len / 4, / 2, 3/4, 1
    c.data.num_threads = 16
    c.data.image_mode = ""          # "pad" | "square"; "" = the stage's (docs/model.md §2: stage 1 square, 2 pad)
    c.data.image_cache_mb = 0       # > 0: decoded images stay in memory (the study's rows share them)
    c.data.allow_outside_paths = False   # True: image paths may be absolute or leave image_folder via ".."
    c.data.max_image_pixels = 1 << 26    # larger images are skipped and counted (too_many_pixels), not decoded
    c.data.packing = False          # True: several conversations per row up to max_len (data/packing.py)
    c.data.feature_bank = False     # True (frozen tower only): its features of every image computed once
                                    # and fed instead of pixels (training/feature_bank.py; small image sets)

    # LoRA on the language model (infllava_jax/lora.py): rank 0 = off (the stage trains the LLM in
    # full); rank > 0 freezes the LLM base and trains adapters on `targets`. WORKDIR/final is
    # always merged; export="adapters" also writes WORKDIR/final_lora (PEFT + LLaVA files).
    c.lora = ConfigDict({"rank": 0, "alpha": 16.0, "dropout": 0.0,
                         "targets": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
                         "export": "merged"})

    c.loss_chunk = 512
    c.optimizer = ConfigDict({"lr": 2e-5, "warmup_ratio": 0.03, "weight_decay": 0.0, "max_grad_norm": 1.0})
    c.eval_every = 0                # > 0: score eval_config on eval_data every N steps (in-memory params)
    c.eval_config = "tasks=pope,res=1008,limit=64"   # configs/eval.py arguments
    c.eval_data = ""                # directory of the eval tasks' local files
    c.compilation_cache_dir = ""    # "" = ~/.cache/infllava_jax/xla
    c.export_final = True           # write WORKDIR/final (our checkpoint) at the end
    c.preemption_signal = "SIGUSR1"  # besides SIGTERM and Ctrl-C: stop at the next step with a checkpoint
                                    # ("" = none; docs/preemption.md, training/preemption.py)
    return c


def parse_arg(arg: str | None, **defaults) -> dict:
    """'a=1,b=x' -> {'a': 1, 'b': 'x'} over `defaults` (values take the defaults' types)."""
    out = dict(defaults)
    for kv in filter(None, (arg or "").split(",")):
        k, _, v = kv.partition("=")
        if k not in out:
            raise ValueError(f"config argument {k!r}; expected one of {sorted(out)}")
        out[k] = type(out[k])(v) if out[k] is not None else v
    return out
