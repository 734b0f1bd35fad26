"""DataConfig: every setting of the data pipeline (pipeline.py), and which of them a training
config sets.

A training config's `data` section is built from these fields and their defaults
(training_defaults(), used by the training config's base), so each one is settable as
`--config.data.<name>=...`; the few that the run derives from elsewhere are listed in
RUN_DERIVED with where they come from. docs/configuration.md lists them all.
"""
from __future__ import annotations

import dataclasses

from infllava_jax.data.batching import default_buckets
from infllava_jax.data.examples import SampleSpec
from infllava_jax.data.images import MAX_IMAGE_PIXELS


@dataclasses.dataclass(frozen=True)
class DataConfig:
    data_path: str                        # LLaVA .json / .jsonl, or an ArrayRecord dir (arrayrecord.py)
    image_folder: str = ""                # root of the records' relative "image" paths
    template: str = "llama3"              # stage 1: "plain"
    image_size: int = 1008                # model's high-res input (InfLlavaConfig.image_size)
    image_mode: str = "pad"               # stage 1: "square"
    tokens_per_image: int = 576           # InfLlavaConfig.tokens_per_image
    max_len: int = 2048                   # after splicing
    double_bos: bool = False              # True: the released doubled BOS (template.py)
    system_prompt: bool = True            # False: llama3 records without the system turn (template.py)
    batch_size: int = 8                   # per process
    buckets: tuple[int, ...] | None = None  # spliced lengths; None: default_buckets(max_len, T)
    seed: int = 0
    shuffle: bool = True
    num_epochs: int | None = None         # None: repeat forever (stop on a step count)
    drop_remainder: bool = True           # static batch size
    max_bad_fraction: float = 0.01        # stop once more than this fraction of the samples read is bad ...
    min_bad_samples: int = 3              # ... and at least this many are (docs/bad-input.md)
    num_threads: int = 16                 # grain read threads (0: synchronous)
    prefetch_buffer: int = 64             # samples read ahead per thread pool
    num_workers: int = 0                  # >0: grain mp_prefetch worker processes
    image_cache_mb: int = 0               # >0: keep decoded images in memory (images.ImageCache)
    token_cache_mb: int = 0               # >0: keep each record's token ids in memory (tokenized once)
    allow_outside_paths: bool = False     # image paths may be absolute or leave image_folder with ".."
    max_image_pixels: int = MAX_IMAGE_PIXELS  # larger images are skipped (too_many_pixels), never decoded
    packing: bool = False                 # True: several conversations per row up to max_len (packing.py)

    def __post_init__(self):
        for name in ("max_len", "batch_size", "max_image_pixels"):
            _at_least(self, name, 1)
        for name in ("min_bad_samples", "num_threads", "prefetch_buffer", "num_workers", "image_cache_mb",
                     "token_cache_mb"):
            _at_least(self, name, 0)
        if self.num_epochs is not None:
            _at_least(self, "num_epochs", 1)
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise ValueError(f"max_bad_fraction={self.max_bad_fraction}: expected a fraction in [0, 1]")
        if self.buckets is not None and (not self.buckets or max(self.buckets) != self.max_len):
            raise ValueError(f"buckets={self.buckets}: the largest bucket must equal max_len={self.max_len}")
        self.spec  # validates the per-sample fields

    @property
    def spec(self) -> SampleSpec:
        return SampleSpec(template=self.template, image_size=self.image_size, image_mode=self.image_mode,
                          tokens_per_image=self.tokens_per_image, max_len=self.max_len,
                          double_bos=self.double_bos, system_prompt=self.system_prompt)

    @property
    def bucket_lengths(self) -> tuple[int, ...]:
        return tuple(sorted(self.buckets or default_buckets(self.max_len, self.tokens_per_image)))

    @classmethod
    def for_model(cls, model_config, data_path: str, image_folder: str = "", stage: int = 2, **kw):
        """Image size and tokens per image from an InfLlavaConfig; stage 1 = plain + square."""
        H, W = model_config.image_size
        if H != W:
            raise NotImplementedError(f"non-square inputs ({H}x{W}) have no released preprocessing")
        base = dict(template="plain", image_mode="square") if stage == 1 else {}
        return cls(data_path=data_path, image_folder=image_folder, image_size=H,
                   tokens_per_image=model_config.tokens_per_image, **{**base, **kw})


def _at_least(cfg: DataConfig, name: str, low: int) -> None:
    value = getattr(cfg, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name}={value!r}: expected an integer >= {low}")


# Fields a training run sets from elsewhere, and where from (not in the config's `data` section).
RUN_DERIVED = {
    "image_size": "the model's input size",
    "tokens_per_image": "the model",
    "batch_size": "micro_batch",
    "seed": "seed",
    "num_epochs": "none: training repeats the data until total_steps",
    "drop_remainder": "none: training batches are always full",
}
# Training-config names that differ from the field's, and defaults that mean "the stage's".
TRAINING_NAMES = {"data_path": "path"}
TRAINING_DEFAULTS = {"data_path": "", "template": "", "image_mode": "", "buckets": ()}


def training_defaults() -> dict:
    """{training-config name: default} of every DataConfig field a training config sets.
    template / image_mode "" = the stage's (stage 1: plain, square; stage 2: llama3, pad);
    buckets () = default_buckets."""
    return {TRAINING_NAMES.get(f.name, f.name): TRAINING_DEFAULTS.get(f.name, f.default)
            for f in dataclasses.fields(DataConfig) if f.name not in RUN_DERIVED}


def from_training(section: dict) -> dict:
    """DataConfig keyword arguments from a training config's `data` section (only the keys it
    has, under their field names; the empty "the stage's / default" values left out)."""
    names = {TRAINING_NAMES.get(f.name, f.name): f.name for f in dataclasses.fields(DataConfig)
             if f.name not in RUN_DERIVED}
    out = {names[k]: v for k, v in section.items() if k in names}
    return {k: (tuple(v) if k == "buckets" else v) for k, v in out.items()
            if not (k in TRAINING_DEFAULTS and k != "data_path" and v in ("", ()))}
