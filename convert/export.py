"""python -m convert.export CKPT DST [--format released|hf]: our checkpoint -> PyTorch files.

released: the released INF-LLaVA layout (docs/model.md section 8 keys, shapes; dtype of the checkpoint
unless --dtype): sharded safetensors + model.safetensors.index.json + config.json
(model_type llava_llama, plus `mm_vision_config` / `dem_config`, which PyTorch code ignores
and which let `python -m convert` re-import the files alone). released -> ours -> released
reproduces every tensor bit for bit.
hf: transformers' LlavaForConditionalGeneration files (LLaVA-1.5 models only; the key layout
of transformers 4.x, which 4.x and 5.x both load).

Parameters are read from the Orbax checkpoint slice by slice (tensorstore) and written piece
by piece: memory stays at a few hundred MB whatever the model size.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from flax.traverse_util import flatten_dict

from convert import engine, formats
from convert.errors import ConversionError
from convert.importer import progress_bar
from convert.sources import Tensor, ranges
from convert.writers import DEFAULT_SHARD_BYTES, write_safetensors
from infllava_jax.params import abstract_params
from infllava_jax.checkpoint import (PARAMS_DIR, CheckpointError, atomic_directory, load_config, read_orbax,
                                     saved_metadata)
from infllava_jax import conversation
from infllava_jax.config import InfLlavaConfig
from infllava_jax.errors import one_line
from infllava_jax.vision import CLIPVisionConfig


EXPORT_CACHE_BYTES = 256 << 20


class CheckpointTensor(Tensor):
    """One parameter of our Orbax checkpoint, read slice by slice with tensorstore."""

    def __init__(self, params_dir: Path, name: str, shape, dtype, use_ocdbt: bool, use_zarr3: bool, context):
        import orbax.checkpoint as ocp
        self.shape, self.dtype, self.where = tuple(shape), np.dtype(dtype), f"{params_dir}:{name}"
        self.params_dir = params_dir
        info = ocp.type_handlers.ParamInfo(name=name, parent_dir=params_dir, is_ocdbt_checkpoint=use_ocdbt,
                                           use_zarr3=use_zarr3, ts_context=context)
        self._spec, self._context, self._store = ocp.type_handlers.get_json_tspec_read(info, use_ocdbt), context, None

    def read(self, index=None) -> np.ndarray:
        import tensorstore as ts

        def read():
            if self._store is None:
                self._store = ts.open(self._spec, open=True, context=self._context).result()
            return self._store[tuple(slice(a, b) for a, b in ranges(index, self.shape))].read().result()
        return read_orbax(self.params_dir, read, False)


def open_checkpoint(path) -> tuple[InfLlavaConfig, dict[str, CheckpointTensor]]:
    """(config, {our path: CheckpointTensor}) of a checkpoint written by save_pretrained / convert."""
    import orbax.checkpoint as ocp
    config = load_config(path)
    params_dir = Path(path).absolute() / PARAMS_DIR
    meta = read_orbax(params_dir, lambda: dict(json.loads((params_dir / "_METADATA").read_text())), False)
    want = flatten_dict(abstract_params(config), sep="/")
    saved = flatten_dict(saved_metadata(params_dir), sep="/")
    if set(saved) != set(want):
        raise ConversionError(f"{params_dir}: parameters do not match config.json: missing "
                              f"{sorted(set(want) - set(saved))[:5]}, unexpected {sorted(set(saved) - set(want))[:5]}")
    import tensorstore as ts
    # a chunk cache: one zarr chunk may hold several layers, each exported as its own tensor
    context = ts.Context(ts.Context.Spec({"cache_pool": {"total_bytes_limit": EXPORT_CACHE_BYTES}}),
                         parent=ocp.type_handlers.get_ts_context(use_ocdbt=meta.get("use_ocdbt", True)))
    out = {}
    for p, spec in want.items():
        if tuple(saved[p].shape) != tuple(spec.shape):
            raise ConversionError(f"{params_dir}: {p} has shape {tuple(saved[p].shape)}, config.json says {spec.shape}")
        out[p] = CheckpointTensor(params_dir, p.replace("/", "."), spec.shape, saved[p].dtype,
                                  meta.get("use_ocdbt", True), meta.get("use_zarr3", False), context)
    return config, out


# ----------------------------------------------------------------------------- config.json

def released_config_json(config: InfLlavaConfig, dtype: str) -> dict:
    d = config.llm.to_hf()
    arch = config.vision.to_hf()
    is_l14 = arch == CLIPVisionConfig.clip_vit_l14_336().to_hf()
    d.update(model_type="llava_llama", architectures=["LlavaLlamaForCausalLM"], torch_dtype=dtype, use_cache=True,
             pad_token_id=config.pad_token_id, mm_vision_tower=formats.CLIP_L14_336 if is_l14 else None,
             mm_hidden_size=config.vision.hidden_size, mm_projector_type="mlp2x_gelu",
             mm_vision_select_layer=config.select_layer, mm_vision_select_feature="patch",
             mm_patch_merge_type="flat", mm_use_im_start_end=False, mm_use_im_patch_token=False,
             image_aspect_ratio="pad", tokenizer_model_max_length=2048, tokenizer_padding_side="right",
             **{formats.VISION_CONFIG_FIELD: arch})
    if config.dem is not None:
        d[formats.DEM_CONFIG_FIELD] = {k: getattr(config.dem, k) for k in formats.DEM_ARCH_FIELDS}
    return d


def hf_config_json(config: InfLlavaConfig, dtype: str) -> dict:
    if config.image_token_index < 0:
        raise ConversionError(f"--format hf needs the image token id of the tokenizer; the checkpoint uses the "
                              f"sentinel {config.image_token_index}: pass --image-token-index")
    text = config.llm.to_hf()
    text.pop("architectures")
    return {"architectures": ["LlavaForConditionalGeneration"], "model_type": "llava", "dtype": dtype,
            "image_token_index": config.image_token_index, "projector_hidden_act": "gelu",
            "multimodal_projector_bias": True, "vision_feature_layer": config.select_layer,
            "vision_feature_select_strategy": "default", "image_seq_length": config.tokens_per_image,
            "tie_word_embeddings": config.llm.tie_word_embeddings, "pad_token_id": config.pad_token_id,
            "text_config": text, "vision_config": config.vision.to_hf()}


# ----------------------------------------------------------------------------- export

def export(ckpt, dst, *, fmt: str = "released", dtype: str = "auto", with_vision: bool = True,
           image_token_index: int | None = None, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
           overwrite: bool = False, progress: bool = True, log=print) -> list[str]:
    config, leaves = open_checkpoint(ckpt)
    if image_token_index is not None:
        config = config.replace(image_token_index=image_token_index)
    out_dtype = None if dtype == "auto" else np.dtype(formats.pick_dtype(dtype, None))
    if fmt == "released":
        rows = formats.released_rows(config, with_vision=with_vision)
        if not with_vision:
            leaves = {p: t for p, t in leaves.items() if not p.startswith("vision_tower/")}
    elif fmt == "hf":
        if config.dem is not None:
            raise ConversionError("--format hf is LlavaForConditionalGeneration, i.e. LLaVA-1.5 without DEM; this "
                                  "checkpoint has a DEM (INF-LLaVA has no transformers class): use --format released")
        rows = formats.llava_hf_rows(config)
    else:
        raise ConversionError(f"--format {fmt}: expected released or hf")
    tensors = engine.export_plan(rows, leaves, dtype=out_dtype)
    lm = next(t for k, t in tensors.items() if k.endswith("embed_tokens.weight"))
    dtype_name = np.dtype(lm.dtype).name
    cfg_json = released_config_json(config, dtype_name) if fmt == "released" else hf_config_json(config, dtype_name)
    total = sum(t.nbytes for t in tensors.values())
    log(f"{ckpt} -> {dst}: {fmt} layout, {len(tensors)} tensors, {total / 1e9:.2f} GB")
    names: list[str] = []

    def fill(tmp: Path):
        with progress_bar(total, "export", progress) as bar:
            names.extend(write_safetensors(tensors, tmp, max_shard_bytes=max_shard_bytes, progress=bar.update))
        (tmp / "config.json").write_text(json.dumps(cfg_json, indent=2) + "\n")
        copied = conversation.copy_tokenizer_files(ckpt, tmp)   # the checkpoint's tokenizer travels along
        log(f"tokenizer files: {', '.join(copied)}" if copied else f"{ckpt} has no tokenizer files to carry")

    try:
        atomic_directory(Path(dst), fill, overwrite=overwrite)
    except FileExistsError:
        raise ConversionError(f"{dst} exists (pass --overwrite to replace it)") from None
    return names


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m convert.export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ckpt", help="our checkpoint (InfLlava.save_pretrained / python -m convert)")
    p.add_argument("dst", help="output directory")
    p.add_argument("--format", dest="fmt", default="released", choices=("released", "hf"))
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="dtype of the written tensors (auto: the checkpoint's)")
    p.add_argument("--no-vision-tower", dest="with_vision", action="store_false",
                   help="released: leave the CLIP weights out (as released checkpoints without them)")
    p.add_argument("--image-token-index", type=int, help="hf: the tokenizer's <image> id")
    p.add_argument("--max-shard-size", type=float, default=DEFAULT_SHARD_BYTES / 1e9, help="GB per shard")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    a = p.parse_args(argv)
    try:
        export(a.ckpt, a.dst, fmt=a.fmt, dtype=a.dtype, with_vision=a.with_vision, image_token_index=a.image_token_index,
               max_shard_bytes=int(a.max_shard_size * 1e9), overwrite=a.overwrite, progress=a.progress)
    except (ConversionError, CheckpointError, OSError) as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
