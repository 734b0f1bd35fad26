"""The evaluation sweep's config: every field eval.py reads with its default, and the
`tasks=...,res=...` argument of `--config configs/eval.py:ARGS` (list values joined with "+").
What the fields mean: configs/eval.py.
"""
from ml_collections import ConfigDict

_LISTS = {"tasks": str, "res": int, "length_buckets": int, "image_buckets": int}


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
    c.tokenizer = ""                # "" = the checkpoint's tokenizer files; "tiny"; or a directory
    c.scorers = ""                  # e.g. "pope=llava,docvqa=lmms_eval_2024_07"
    c.temperature = 0.0             # 0 = greedy (the protocol); > 0 = sampling with top_p
    c.top_p = 1.0
    c.seed = 0
    c.workers = 4                   # image decoding / preprocessing threads
    c.progress = True
    c.model_id = "infllava_jax"
    for part in filter(None, (p.strip() for p in (arg or "").split(","))):
        key, sep, value = part.partition("=")
        if not sep or key not in c:
            raise ValueError(f"configs/eval.py: bad argument {part!r}; expected key=value with key in {sorted(c)}")
        if key in _LISTS:
            c[key] = tuple(_LISTS[key](v) for v in value.split("+") if v)
        else:
            typ = type(c[key])
            c[key] = (value.lower() in ("1", "true", "yes")) if typ is bool else typ(value)
    return c
