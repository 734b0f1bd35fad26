"""Pre-processed LLaVA data as a tensorflow-datasets ArrayRecord dataset (TensorFlow not needed).

`build_array_record` runs a tfds `GeneratorBasedBuilder` once over a LLaVA JSON file: every
record is tokenised with its template (untruncated input_ids + labels) and its image decoded,
padded/cropped and resized to the training size (uint8), stored PNG-encoded (lossless, so
reading back gives the JSON pipeline's pixels exactly; "jpeg" is smaller but lossy).
Bad records are dropped and counted at build time. Training then only decodes the PNG,
truncates and normalises: `make_dataset` reads the directory with
`grain.sources.ArrayRecordDataSource` and decodes records with the builder's tfds features.

tfds 4.9 writes and reads ArrayRecord without TensorFlow as long as no feature needs TF to
encode: `tfds.features.Image` does (it encodes with tf.image), so the image is a plain bytes
Tensor encoded with PIL here. The layout is ordinary tfds: `<dir>/<name>/<version>/`
`dataset_info.json`, `features.json`, `metadata.json`, `llava_array_record-train.array_record-0000i-of-0000n`;
`tfds.builder_from_directory(<that dir>)` opens it.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import glob
import io
import json
import multiprocessing
import os

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from infllava_jax.data.examples import (BAD_REASONS, ImagePolicy, SampleSpec, TemplateError, bad, example,
                                        tokenize_record, truncate)
from infllava_jax.data.images import normalize
from infllava_jax.data.llava_json import read_llava_json

VERSION = "1.0.0"
_BUILD_KEYS = ("template", "image_size", "image_mode", "double_bos", "system_prompt")  # must match at read time
_BUILT_BEFORE = {"system_prompt": True}     # keys a build written before them lacks: what it used


@dataclasses.dataclass
class LlavaConfig(tfds.core.BuilderConfig):
    json_path: str = ""
    image_folder: str = ""
    template: str = "llama3"
    image_size: int = 1008
    image_mode: str = "pad"
    double_bos: bool = False
    system_prompt: bool = True
    image_format: str = "png"
    allow_outside_paths: bool = False


class _Encoder:
    """(index, record) -> tfds example dict, or a bad-sample dict. Picklable (worker processes)."""

    def __init__(self, tokenizer, cfg: LlavaConfig):
        self.tokenizer, self.cfg = tokenizer, cfg

    def __call__(self, item):
        index, record = item
        try:
            ids, labels, rels = tokenize_record(record, self.tokenizer, self.cfg.template, self.cfg.double_bos,
                                               self.cfg.system_prompt)
            if len(rels) > 1:
                raise TemplateError("bad_fields", f"{len(rels)} images: the ArrayRecord build stores one "
                                                  "image per sample (multi-image data: use the JSON path)")
        except TemplateError as e:
            return bad(e.reason, index, str(e))
        rel = rels[0] if rels else None
        data = b""
        if rel is not None:
            try:
                pixels = ImagePolicy(self.cfg.image_folder, self.cfg.allow_outside_paths).load(
                    rel, self.cfg.image_size, self.cfg.image_mode)
            except TemplateError as e:
                return bad(e.reason, index, str(e))
            buf = io.BytesIO()
            if self.cfg.image_format == "png":
                Image.fromarray(pixels).save(buf, format="PNG")
            else:
                Image.fromarray(pixels).save(buf, format="JPEG", quality=95)
            data = buf.getvalue()
        return {"index": index, "id": str(record.get("id", "")), "input_ids": ids, "labels": labels,
                "has_image": rel is not None, "image": data}


class LlavaArrayRecord(tfds.core.GeneratorBasedBuilder):
    """One `train` split of pre-tokenised, pre-resized LLaVA samples in source order."""

    VERSION = tfds.core.Version(VERSION)
    BUILDER_CONFIGS = []  # every build passes its own LlavaConfig (its name is a directory level)

    def __init__(self, *, tokenizer=None, num_workers: int = 0, **kwargs):
        self._tokenizer, self._num_workers = tokenizer, num_workers
        self.bad_counts = {r: 0 for r in BAD_REASONS}
        super().__init__(**kwargs)

    def _info(self):
        f = tfds.features
        c = self.builder_config
        return tfds.core.DatasetInfo(
            builder=self, disable_shuffling=True,  # keep source order: same indices as the JSON
            description="LLaVA conversations tokenised with the INF-LLaVA template; images resized.",
            features=f.FeaturesDict({
                "index": f.Tensor(shape=(), dtype=np.int64),
                "id": f.Text(),
                "input_ids": f.Tensor(shape=(None,), dtype=np.int32),
                "labels": f.Tensor(shape=(None,), dtype=np.int32),
                "has_image": f.Tensor(shape=(), dtype=np.bool_),
                "image": f.Tensor(shape=(), dtype=np.object_),  # PNG/JPEG bytes, b"" if text-only
            }),
            metadata=tfds.core.MetadataDict({k: getattr(c, k) for k in (*_BUILD_KEYS, "image_format")}))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        c = self.builder_config
        records = read_llava_json(c.json_path)
        encode = _Encoder(self._tokenizer, c)
        items = enumerate(records)
        if self._num_workers > 0:
            ctx = multiprocessing.get_context("spawn")
            with concurrent.futures.ProcessPoolExecutor(self._num_workers, mp_context=ctx) as pool:
                yield from self._keep_good(pool.map(encode, items, chunksize=64))
        else:
            yield from self._keep_good(map(encode, items))

    def _keep_good(self, outputs):
        for out in outputs:
            if "bad" in out:
                self.bad_counts[out["bad"]] += 1
            else:
                yield out["index"], out


def build_array_record(json_path: str, image_folder: str, tokenizer, out_dir: str, *, name: str = "llava",
                       template: str = "llama3", image_size: int = 1008, image_mode: str = "pad",
                       double_bos: bool = False, system_prompt: bool = True, image_format: str = "png",
                       num_workers: int = 0, max_bad_fraction: float = 0.01,
                       allow_outside_paths: bool = False) -> tuple[str, dict]:
    """Pre-process a LLaVA JSON dataset once -> (dataset directory, bad-record counts).

    The directory is `out_dir/llava_array_record/<name>/1.0.0`; calling again with the same
    settings reuses it (counts from its `llava_build.json`), other settings raise. Raises if more
    than `max_bad_fraction` of the records are bad (naming the JSON file)."""
    if image_format not in ("png", "jpeg"):
        raise ValueError(f"image_format must be 'png' or 'jpeg', got {image_format!r}")
    cfg = LlavaConfig(name=name, json_path=json_path, image_folder=image_folder, template=template,
                      image_size=image_size, image_mode=image_mode, double_bos=double_bos,
                      system_prompt=system_prompt, image_format=image_format,
                      allow_outside_paths=allow_outside_paths)
    builder = LlavaArrayRecord(tokenizer=tokenizer, num_workers=num_workers, config=cfg,
                               data_dir=out_dir, file_format="array_record")
    report_path = os.path.join(builder.data_dir, "llava_build.json")
    if os.path.exists(os.path.join(builder.data_dir, "dataset_info.json")):  # built before: reuse
        report = json.load(open(report_path))
        if report["config"] != dataclasses.asdict(cfg):
            raise ValueError(f"{builder.data_dir} holds a build with {report['config']}; "
                             "delete it or pick another `name`/`out_dir`")
        return builder.data_dir, report["bad"]
    builder.download_and_prepare()
    counts = {k: v for k, v in builder.bad_counts.items() if v}
    n_good = builder.info.splits["train"].num_examples
    with open(report_path, "w") as f:
        json.dump({"config": dataclasses.asdict(cfg), "good": n_good, "bad": counts}, f, indent=1, default=str)
    n_bad = sum(counts.values())
    if n_bad > max_bad_fraction * (n_bad + n_good):
        raise ValueError(f"{json_path}: {n_bad} of {n_bad + n_good} records are bad "
                         f"(> max_bad_fraction={max_bad_fraction}): {counts}")
    return builder.data_dir, counts


# ----------------------------------------------------------------------------- reading

class _Decoder:
    """(position, serialized record) -> example | bad, truncated for the reading spec."""

    def __init__(self, data_dir: str, spec: SampleSpec):
        self.data_dir, self.spec = data_dir, spec
        self._features = None

    def __getstate__(self):  # workers reload the features spec themselves
        return {"data_dir": self.data_dir, "spec": self.spec, "_features": None}

    def __call__(self, item):
        if self._features is None:
            self._features = tfds.builder_from_directory(self.data_dir).info.features
        ex = self._features.deserialize_example_np(item[1])
        index = int(ex["index"])
        try:
            ids, labels = truncate(ex["input_ids"], ex["labels"], self.spec.ids_budget)
        except TemplateError as e:
            return bad(e.reason, index, str(e))
        pixels = None
        if ex["has_image"]:
            pixels = normalize(np.asarray(Image.open(io.BytesIO(ex["image"])).convert("RGB")))
        return example(ids, labels, pixels, index, truncated=len(ids) < len(ex["input_ids"]))


def open_array_record(data_dir: str, spec: SampleSpec):
    """-> (grain ArrayRecordDataSource, decoder) for pipeline.make_dataset; checks the build matches."""
    import grain
    info = tfds.builder_from_directory(data_dir).info
    built = {k: info.metadata[k] if k in info.metadata else _BUILT_BEFORE[k] for k in _BUILD_KEYS}
    wanted = {k: getattr(spec, k) for k in _BUILD_KEYS}
    if built != wanted:
        raise ValueError(f"{data_dir} was built with {built}, but the pipeline wants {wanted}")
    files = sorted(glob.glob(os.path.join(data_dir, "*-train.array_record-*")))
    if not files:
        raise FileNotFoundError(f"no '*-train.array_record-*' files in {data_dir}")
    return grain.sources.ArrayRecordDataSource(files), _Decoder(data_dir, spec)
