"""The evaluation sweep's config: every field eval.py reads with its default, and the
`tasks=...,res=...` argument of `--config configs/eval.py:ARGS` (list values joined with "+";
overrides.py), and the check of every value (`check`).
What the fields mean: configs/eval.py.
"""
from ml_collections import ConfigDict

from infllava_jax import overrides


def get_config(arg: str | None = None) -> ConfigDict:
    c = ConfigDict()
    c.tasks = ("pope",)
    c.res = (1008,)
    c.batch_size = 8                # global batch (rounded up to a multiple of the data-parallel size)
    c.limit = 0                     # > 0: first N rows of each task
    c.max_new_tokens = 0            # > 0: cap every task's protocol value
    # "" = as the checkpoint records in usage.json (conversation.py; docs/using.md):
    c.template = ""                 # "llama3" | "vicuna_v1" (LLaVA-1.5)
    c.pixels = ""                   # "released" | "native" (see above)
    c.image_mode = ""               # "pad" (stage 2 / inference) | "square"
    c.double_bos = ""               # "true": the released loader's doubled <|begin_of_text|> (docs/model.md §6)
    c.length_buckets = (64, 128, 256, 512, 1024, 2048)
    c.image_buckets = (1, 2, 4, 8)
    c.mesh = ""                     # "" = every device on `data`; e.g. "data=2,fsdp=4"
    c.distributed = False           # multi-host: jax.distributed.initialize() first (TPU pods, SLURM, ...)
    c.dtype = ""                    # "" = as saved; "bfloat16" compute
    c.quant = ""                    # "" = as saved; "int8" | "int4": weight-only quantized language model (quant.py)
    c.tokenizer = ""                # "" = the checkpoint's tokenizer files; "tiny"; or a directory
    c.scorers = ""                  # e.g. "pope=llava,docvqa=lmms_eval_2024_07"
    c.temperature = 0.0             # 0 = greedy (the protocol); > 0 = sampling with top_p
    c.top_p = 1.0
    c.seed = 0
    c.workers = 4                   # image decoding / preprocessing threads
    c.progress = True
    c.model_id = "infllava_jax"
    for key, value in overrides.parse_arg(arg, **c).items():
        c[key] = value
    return c


def check(c: ConfigDict) -> None:
    """Every value in its accepted set or range (overrides.ConfigError naming the first that is not)."""
    overrides.check(c, RULES)


def _tasks(names) -> str | None:
    from infllava_jax.evaluation.tasks import TASKS
    unknown = [t for t in names if t not in TASKS]
    return (f"unknown task {unknown[0]!r}; accepted: {', '.join(TASKS)}{overrides.did_you_mean(unknown[0], TASKS)}"
            if unknown else None if names else "expected at least one task")


def _resolutions(res) -> str | None:
    bad = [r for r in res if not isinstance(r, int) or r < 336 or r % 336]
    return f"expected multiples of 336 (336 * grid n), e.g. 336+672+1008; got {bad}" if bad or not res else None


RULES = {"tasks": _tasks, "res": _resolutions, "batch_size": [1, None], "limit": [0, None],
         "max_new_tokens": [0, None], "pixels": ("", "released", "native"), "image_mode": ("", "pad", "square"),
         "dtype": ("", "float32", "bfloat16", "float16"), "quant": ("", "int8", "int4"), "temperature": [0, None], "top_p": [0, 1],
         "workers": [1, None]}

