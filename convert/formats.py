"""Source formats: how each kind of PyTorch checkpoint maps onto our model, as data.

Every INF-LLaVA source is first presented as one *released-layout state dict* (docs/model.md section 8
key names), possibly virtual: CLIP tensors renamed under the released vision prefix, Llama
tensors with the `<pad>` row appended, fresh DEM/projector tensors. One table
(`released_rows`) then converts all of them, and `convert --verify` feeds the same state
dict to the PyTorch reference. LLaVA-1.5 (transformers' LlavaForConditionalGeneration) has
its own table (`llava_hf_rows`) in any of its three key layouts.

    kind            SRC                                     extra inputs
    released        INF-LLaVA dir (config.json llava_llama)  --vision-tower if it holds no CLIP weights
    stage2-start    mm_projector.bin (or a dir holding it)   --vision-tower CLIP, --llm Llama-3
    stage1-start    HF Llama dir / HF CLIP dir               the other one (--vision-tower / --llm)
    lora            LLaVA LoRA dir (PEFT adapter + non_lora_trainables.bin, convert/lora.py)
                                                            --vision-tower CLIP, --llm Llama-3 (the base)
    llava-hf        LlavaForConditionalGeneration dir        -
"""
from __future__ import annotations

import dataclasses
import fnmatch
import json
from pathlib import Path
from typing import Any, Mapping

import jax
import numpy as np

from convert import lora as lora_files
from convert.errors import ConversionError, MissingKeysError, listing
from convert.sources import GrownRows, InitTensor, Tensor, open_weights
from infllava_jax import dem, keymap, llama, projector, vision
from infllava_jax.config import InfLlavaConfig
from infllava_jax.dem import DEMConfig
from infllava_jax.errors import one_line
from infllava_jax.llama import LlamaConfig
from infllava_jax.vision import CLIPVisionConfig

RELEASED_VISION_PREFIX = "model.vision_tower.vision_tower.vision_model."
CLIP_L14_336 = "openai/clip-vit-large-patch14-336"
# CLIPModel's text half and joint projections: not part of any LLaVA, dropped by design.
CLIP_TEXT_KEYS = ("text_model.*", "visual_projection.weight", "text_projection.weight", "logit_scale")
# Extra config.json fields our export writes so that a re-import needs no other input
# (PyTorch code ignores them): the CLIP vision config and the DEM architecture.
VISION_CONFIG_FIELD, DEM_CONFIG_FIELD = "mm_vision_config", "dem_config"
DEM_ARCH_FIELDS = ("variant", "hidden", "num_heads", "head_dim", "ffn_hidden", "ffn_out", "ln_eps", "nH", "nW", "g")
RELEASED_DEM_HEADS = 8   # hard-coded in the released SpatialEmbed; not visible in any shape

# transformers' defaults for fields old config.json files leave out (llava-hf's text_config is sparse)
LLAMA_DEFAULTS = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, max_position_embeddings=2048, rms_norm_eps=1e-6,
                      rope_theta=10000.0, tie_word_embeddings=False)
CLIP_VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                            image_size=224, patch_size=32, num_channels=3, layer_norm_eps=1e-5,
                            hidden_act="quick_gelu")
FLOAT_DTYPES = ("float32", "bfloat16", "float16")


# ----------------------------------------------------------------------------- tables

def released_rows(config: InfLlavaConfig, *, with_vision: bool = True) -> list[keymap.Row]:
    """The released INF-LLaVA state dict (docs/model.md section 8) <-> our tree."""
    rows = keymap.prefixed(llama.key_map(config.llm), "language_model/", "")
    rows += keymap.prefixed(projector.key_map(projector.RELEASED_NAMES), "mm_projector/", "model.mm_projector.")
    if config.dem is not None:
        rows += keymap.prefixed(dem.key_map(config.dem), "spatial_embed/", "model.spatial_embed.")
    if with_vision:
        rows += keymap.prefixed(vision.key_map(config.vision), "vision_tower/", RELEASED_VISION_PREFIX)
    return rows


def released_ignore(config: InfLlavaConfig) -> tuple[str, ...]:
    """Buffers (not parameters) a released / HF state dict may hold."""
    return tuple(RELEASED_VISION_PREFIX + k for k in vision.IGNORED_KEYS) + llama.ignored_keys(config.llm)


@dataclasses.dataclass(frozen=True)
class LlavaLayout:
    """Where LlavaForConditionalGeneration's parts are: vision prefix, language-model key
    function, projector prefix."""
    vision: str        # e.g. "vision_tower.vision_model." (4.x files), "vision_tower." (v5 files)
    language: str      # prefix before the Llama `model.*` keys: "language_model.", or "model.language_model." (v5 modules)
    projector: str     # "multi_modal_projector." or "model.multi_modal_projector."

    def llama_key(self, key: str) -> str:
        if self.language.endswith("model.language_model."):   # v5 modules: model.X -> model.language_model.X
            return self.language + key[len("model."):] if key.startswith("model.") else key
        return self.language + key

    @classmethod
    def detect(cls, keys) -> "LlavaLayout":
        keys = set(keys)
        v = find_prefix(keys, vision.ANCHOR_KEY, "vision tower")
        if "model.language_model.embed_tokens.weight" in keys:
            lang = "model.language_model."
        elif "language_model.model.embed_tokens.weight" in keys:
            lang = "language_model."
        else:
            raise MissingKeysError("no language model in the LLaVA checkpoint ('language_model.model.embed_tokens.weight'"
                                   " or 'model.language_model.embed_tokens.weight')")
        p = find_prefix(keys, "multi_modal_projector.linear_1.weight", "projector")
        return cls(v, lang, p + "multi_modal_projector.")


LLAVA_FILE_LAYOUT = LlavaLayout("vision_tower.vision_model.", "language_model.", "multi_modal_projector.")


def llava_hf_rows(config: InfLlavaConfig, layout: LlavaLayout = LLAVA_FILE_LAYOUT) -> list[keymap.Row]:
    """transformers LlavaForConditionalGeneration (LLaVA-1.5) <-> our tree."""
    rows = [dataclasses.replace(r, key=layout.llama_key(r.key))
            for r in keymap.prefixed(llama.key_map(config.llm), "language_model/", "")]
    rows += keymap.prefixed(projector.key_map(projector.HF_NAMES), "mm_projector/", layout.projector)
    rows += keymap.prefixed(vision.key_map(config.vision), "vision_tower/", layout.vision)
    return rows


def llava_hf_ignore(config: InfLlavaConfig, layout: LlavaLayout) -> tuple[str, ...]:
    return (tuple(layout.vision + k for k in vision.IGNORED_KEYS)
            + tuple(layout.llama_key(k) for k in llama.ignored_keys(config.llm)))


def find_prefix(keys, anchor: str, what: str, within: str = "") -> str:
    """The unique p with p + anchor in keys (p starting with `within`)."""
    found = sorted(k[: -len(anchor)] for k in keys
                   if (k == anchor or k.endswith("." + anchor)) and k.startswith(within))
    if len(found) != 1:
        raise MissingKeysError(f"cannot find one {what} ('*{anchor}'" + (f" under {within!r}" if within else "")
                               + f"): found prefixes {found}")
    return found[0]


# ----------------------------------------------------------------------------- configs

def read_config(directory: Path) -> dict:
    f = Path(directory) / "config.json"
    if not f.is_file():
        raise ConversionError(f"{directory}: no config.json")
    try:
        d = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConversionError(f"{f}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise ConversionError(f"{f}: expected a JSON object, got {type(d).__name__}")
    return d


# integer fields of a config.json that size tensors: positive and at most this (default 2**24), so
# that a damaged config.json cannot make the converter build millions of key-map rows
SIZE_FIELDS = {"vocab_size": 1 << 24, "hidden_size": 1 << 20, "intermediate_size": 1 << 22,
               "num_hidden_layers": 1024, "num_attention_heads": 4096, "num_key_value_heads": 4096,
               "image_size": 1 << 16, "patch_size": 1 << 12, "num_channels": 16}


def check_sizes(d: Mapping[str, Any], where: str) -> None:
    for k, limit in SIZE_FIELDS.items():
        v = d.get(k, 1)
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= limit:
            raise ConversionError(f"{where}: {k}={v!r}; expected an integer in [1, {limit}]")


def llama_config(d: Mapping[str, Any], where: str = "config.json") -> LlamaConfig:
    d = {**LLAMA_DEFAULTS, **d}
    check_sizes(d, where)
    try:
        return LlamaConfig.from_hf(d)
    except (NotImplementedError, ValueError, TypeError, KeyError, AttributeError) as e:
        raise ConversionError(f"{where}: Llama config: {e}") from None


def clip_config(d: Mapping[str, Any], where: str = "config.json") -> CLIPVisionConfig:
    d = d.get("vision_config", d) if isinstance(d, Mapping) else d
    if not isinstance(d, Mapping):
        raise ConversionError(f"{where}: the CLIP vision config is a {type(d).__name__}, not an object")
    d = {**CLIP_VISION_DEFAULTS, **{k: v for k, v in d.items() if v is not None}}
    check_sizes(d, where)
    try:
        return CLIPVisionConfig.from_hf(d)
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise ConversionError(f"{where}: CLIP vision config: {e}") from None


def dem_config(cfg_json: Mapping[str, Any], tensors: Mapping[str, Tensor], vision_cfg: CLIPVisionConfig,
               prefix: str = "model.spatial_embed.") -> DEMConfig:
    """DEM architecture: `dem_config` of config.json if there (our exports), else the released
    module (8 heads, 3x3 grid) with widths read from the tensor shapes."""
    g = vision_cfg.image_size // vision_cfg.patch_size
    D = vision_cfg.hidden_size
    extra = dict(cfg_json.get(DEM_CONFIG_FIELD) or {})
    unknown = sorted(set(extra) - set(DEM_ARCH_FIELDS))
    if unknown:
        raise ConversionError(f"config.json {DEM_CONFIG_FIELD}: unknown field(s) {unknown}")
    kw = dict(hidden=D, num_heads=RELEASED_DEM_HEADS, ffn_out=D // 2, nH=3, nW=3, g=g)
    q, f1 = tensors.get(prefix + "attention.linears.0.weight"), tensors.get(prefix + "ffn_crop.0.weight")
    if q is not None and f1 is not None:
        kw["ffn_hidden"] = int(f1.shape[0])
        heads = int(extra.get("num_heads", RELEASED_DEM_HEADS))
        if q.shape[0] % heads:
            raise ConversionError(f"{prefix}attention.linears.0.weight has {q.shape[0]} outputs, not a multiple of "
                                  f"{heads} heads")
        kw["head_dim"] = int(q.shape[0]) // heads
    else:   # fresh DEM: the released widths scaled to the CLIP width
        kw.update(head_dim=max(1, D // RELEASED_DEM_HEADS), ffn_hidden=64)
    kw.update(extra)
    try:
        return DEMConfig(**kw)
    except (ValueError, TypeError) as e:
        raise ConversionError(f"DEM config: {e}") from None


def with_dtypes(config: InfLlavaConfig, vision_dtype: str, llm_dtype: str, dem_dtype: str) -> InfLlavaConfig:
    """Parameter and compute dtype per component (the projector follows the LLM)."""
    out = config.replace(vision=config.vision.replace(dtype=vision_dtype, param_dtype=vision_dtype),
                         llm=config.llm.replace(dtype=llm_dtype, param_dtype=llm_dtype))
    if config.dem is not None:
        out = out.replace(dem=dataclasses.replace(config.dem, dtype=dem_dtype, param_dtype=dem_dtype))
    return out


def pick_dtype(option: str, anchor: Tensor | None, default: str = "float32") -> str:
    """--dtype: "auto" keeps the source's floating dtype (that of `anchor`)."""
    if option != "auto":
        if option not in FLOAT_DTYPES:
            raise ConversionError(f"--dtype {option}: expected auto or one of {FLOAT_DTYPES}")
        return option
    if anchor is None:
        return default
    name = np.dtype(anchor.dtype).name
    return name if name in FLOAT_DTYPES else default


# ----------------------------------------------------------------------------- sources

@dataclasses.dataclass
class Source:
    """Everything the importer needs: the config, the table, the (virtual) tensors and the
    keys that are deliberately not converted."""
    kind: str
    config: InfLlavaConfig
    rows: list
    tensors: dict[str, Tensor]
    ignore: tuple[str, ...] = ()
    notes: list[str] = dataclasses.field(default_factory=list)
    path: Path | None = None          # SRC (verify loads a llava-hf directory with transformers)


def detect(path: str | Path) -> str:
    """released | llava-hf | clip | llama | adapter (a weights file, or a dir holding only an adapter)
    | lora (a PEFT adapter directory)."""
    path = Path(path)
    if path.is_file():
        return "adapter"
    if not path.is_dir():
        raise ConversionError(f"{path}: no such file or directory")
    if lora_files.is_lora_dir(path):
        return "lora"
    if not (path / "config.json").is_file() and (path / "mm_projector.bin").is_file():
        return "adapter"
    model_type = read_config(path).get("model_type")
    if model_type == "llava_llama":
        has_weights = any(path.glob("*.safetensors")) or any(path.glob("pytorch_model*.bin"))
        return "released" if has_weights or not (path / "mm_projector.bin").is_file() else "adapter"
    kinds = {"llava": "llava-hf", "clip": "clip", "clip_vision_model": "clip", "llama": "llama"}
    if model_type not in kinds:
        raise ConversionError(f"{path}/config.json: model_type {model_type!r} is not a supported source "
                              f"(llava_llama, llava, clip, clip_vision_model, llama)")
    return kinds[model_type]


def _adapter_file(path: Path) -> Path:
    return path / "mm_projector.bin" if path.is_dir() else path


def _clip_tensors(clip_dir: Path, notes: list[str]) -> tuple[dict[str, Tensor], CLIPVisionConfig]:
    """CLIP dir -> (its vision tensors under the released prefix, other unknown keys as they
    are so that the table reports them), vision config."""
    tensors = open_weights(clip_dir)
    pre = find_prefix(tensors, vision.ANCHOR_KEY, f"CLIP vision tower in {clip_dir}")
    out, dropped = {}, []
    for k, t in tensors.items():
        if k.startswith(pre):
            out[RELEASED_VISION_PREFIX + k[len(pre):]] = t
        elif any(fnmatch.fnmatchcase(k, p) for p in CLIP_TEXT_KEYS):
            dropped.append(k)
        else:
            out[k] = t
    if dropped:
        notes.append(f"not converted: {len(dropped)} tensors of CLIP's text tower ({', '.join(CLIP_TEXT_KEYS)})")
    return out, clip_config(read_config(clip_dir), f"{clip_dir}/config.json")


def resolve(src: str | Path, *, vision_tower: str | Path | None = None, llm: str | Path | None = None,
            dtype: str = "auto", add_pad_token: bool = True, seed: int = 0) -> Source:
    """Detect what SRC (+ --vision-tower, --llm) is and present it as a Source."""
    src = Path(src)
    try:
        source = _resolve(src, vision_tower, llm, dtype, add_pad_token, seed)
    except ConversionError:
        raise
    except (TypeError, ValueError, AttributeError, KeyError) as e:   # a field of the wrong type
        raise ConversionError(f"{src}: a config.json field has the wrong type or value "
                              f"({type(e).__name__}: {one_line(e)})") from None
    source.path = source.path or src
    return source


def _resolve(src: Path, vision_tower, llm, dtype: str, add_pad_token: bool, seed: int) -> Source:
    kind = detect(src)
    parts: dict[str, Path] = {kind: src}
    for path, want in ((vision_tower, "clip"), (llm, "llama")):
        if path is None:
            continue
        got = detect(path)
        if got != want:
            raise ConversionError(f"{path}: is a {got} checkpoint; --{'vision-tower' if want == 'clip' else 'llm'} "
                                  f"takes an HF {'CLIP' if want == 'clip' else 'Llama'} directory")
        if want in parts:
            raise ConversionError(f"two {want} directories given ({parts[want]}, {path})")
        parts[want] = Path(path)
    if "released" in parts:
        if "llama" in parts:
            raise ConversionError("a released INF-LLaVA checkpoint holds its language model; drop --llm")
        return _released(parts["released"], parts.get("clip"), dtype)
    if "llava-hf" in parts:
        if len(parts) > 1:
            raise ConversionError("a LlavaForConditionalGeneration checkpoint is complete; drop --vision-tower/--llm")
        return _llava_hf(src, dtype)
    if "clip" in parts and "llama" in parts:
        return _stage_start(parts["clip"], parts["llama"], parts.get("adapter") or parts.get("lora"), dtype,
                            add_pad_token, seed)
    have = ", ".join(f"{k} ({v})" for k, v in parts.items())
    raise ConversionError(
        f"incomplete model: got {have}. An HF CLIP and an HF Llama directory together make an INF-LLaVA "
        f"stage-1 start (pass the other one with --vision-tower CLIP_DIR / --llm LLAMA_DIR); add a "
        f"stage-1 mm_projector.bin as SRC for a stage-2 start, or a LoRA directory as SRC to merge it")


def _released(path: Path, clip_dir: Path | None, dtype: str) -> Source:
    cfg_json = read_config(path)
    for field, want in (("mm_projector_type", "mlp2x_gelu"), ("mm_vision_select_feature", "patch")):
        if cfg_json.get(field, want) != want:
            raise ConversionError(f"{path}/config.json: {field}={cfg_json[field]!r}; only {want!r} is supported")
    notes: list[str] = []
    tensors = dict(open_weights(path))
    vision_keys = [k for k in tensors if k.startswith("model.vision_tower.")]
    clip_cfg = None if clip_dir is None else clip_config(read_config(clip_dir), f"{clip_dir}/config.json")
    if vision_keys:   # the checkpoint's own tower (renamed to the 4.37 prefix if saved otherwise)
        pre = find_prefix(vision_keys, vision.ANCHOR_KEY, "vision tower", within="model.vision_tower.")
        if pre != RELEASED_VISION_PREFIX:
            tensors = {(RELEASED_VISION_PREFIX + k[len(pre):] if k.startswith(pre) else k): t for k, t in tensors.items()}
        if clip_dir is not None:
            notes.append(f"vision tower weights from the checkpoint; {clip_dir} gives only the CLIP config")
    elif clip_dir is not None:
        tensors.update(_clip_tensors(clip_dir, notes)[0])
        notes.append(f"vision tower from {clip_dir}")
    else:
        raise ConversionError(f"{path} holds no vision tower weights: pass --vision-tower CLIP_DIR "
                              f"(an HF CLIP directory, e.g. a download of {cfg_json.get('mm_vision_tower') or CLIP_L14_336})")
    if clip_cfg is not None:
        vision_cfg = clip_cfg
    elif cfg_json.get(VISION_CONFIG_FIELD):
        vision_cfg = clip_config(cfg_json[VISION_CONFIG_FIELD], f"{path}/config.json {VISION_CONFIG_FIELD}")
    elif str(cfg_json.get("mm_vision_tower", "")).rstrip("/").endswith(CLIP_L14_336):
        vision_cfg = CLIPVisionConfig.clip_vit_l14_336()
    else:
        raise ConversionError(f"{path}/config.json names vision tower {cfg_json.get('mm_vision_tower')!r}, whose "
                              f"config is unknown here: pass --vision-tower CLIP_DIR")
    llm_cfg = llama_config(cfg_json, f"{path}/config.json")
    if any(k.startswith("model.spatial_embed.") for k in tensors):
        dem_cfg = dem_config(cfg_json, tensors, vision_cfg)
    elif cfg_json.get(DEM_CONFIG_FIELD):
        raise MissingKeysError(f"{path}/config.json describes a DEM but the checkpoint has no model.spatial_embed.* keys")
    else:   # the original LLaVA-1.5 files (liuhaotian/llava-v1.5-*) share this layout, without DEM
        dem_cfg = None
        notes.append("no model.spatial_embed.*: an original LLaVA-1.5 checkpoint (no DCM/DEM)")
    pad = cfg_json.get("pad_token_id")
    if pad is None and llm_cfg.vocab_size == 128257:
        pad = 128256   # the `<pad>` row the released training appended
    config = InfLlavaConfig(vision=vision_cfg, llm=llm_cfg, dem=dem_cfg,
                            select_layer=int(cfg_json.get("mm_vision_select_layer", -2)), pad_token_id=pad)
    config = with_dtypes(config, pick_dtype(dtype, tensors.get(RELEASED_VISION_PREFIX + vision.ANCHOR_KEY)),
                         pick_dtype(dtype, tensors.get("model.embed_tokens.weight")),
                         pick_dtype(dtype, tensors.get("model.spatial_embed.ln_fuse.weight")))
    return Source("released", config, released_rows(config), tensors, released_ignore(config), notes)


def _llava_hf(path: Path, dtype: str) -> Source:
    cfg_json = read_config(path)
    tensors = open_weights(path)
    layout = LlavaLayout.detect(tensors)
    text = dict(cfg_json.get("text_config") or {})
    text.setdefault("tie_word_embeddings", cfg_json.get("tie_word_embeddings", False))
    if "vocab_size" not in text and "vocab_size" in cfg_json:
        text["vocab_size"] = cfg_json["vocab_size"]
    checks = (("vision_feature_select_strategy", "default"), ("projector_hidden_act", "gelu"),
              ("multimodal_projector_bias", True))
    for field, want in checks:
        if cfg_json.get(field, want) != want:
            raise ConversionError(f"{path}/config.json: {field}={cfg_json[field]!r}; only {want!r} is supported")
    layer = cfg_json.get("vision_feature_layer", -2)
    if not isinstance(layer, int):
        raise ConversionError(f"{path}/config.json: vision_feature_layer={layer!r}; only one layer is supported")
    where = f"{path}/config.json"
    config = InfLlavaConfig(vision=clip_config(cfg_json.get("vision_config") or {}, where),
                            llm=llama_config(text, where),
                            dem=None, select_layer=layer,
                            image_token_index=int(cfg_json.get("image_token_index", cfg_json.get("image_token_id", 32000))),
                            pad_token_id=cfg_json.get("pad_token_id", text.get("pad_token_id")))
    v = pick_dtype(dtype, tensors.get(layout.vision + vision.ANCHOR_KEY))
    config = with_dtypes(config, v, pick_dtype(dtype, tensors.get(layout.llama_key("model.embed_tokens.weight"))), v)
    return Source("llava-hf", config, llava_hf_rows(config, layout), tensors, llava_hf_ignore(config, layout),
                  [f"image token id {config.image_token_index} (as in the HF tokenizer)"], path=path)


def _stage_start(clip_dir: Path, llama_dir: Path, adapter: Path | None, dtype: str, add_pad_token: bool,
                 seed: int) -> Source:
    notes: list[str] = []
    tensors, vision_cfg = _clip_tensors(clip_dir, notes)
    llama_tensors = open_weights(llama_dir)
    llm_cfg = llama_config(read_config(llama_dir), f"{llama_dir}/config.json")
    llama_tensors, adapter_tensors, adapter_json, adapter_note = _adapter(adapter, llama_tensors)
    pad = None
    if add_pad_token:   # docs/model.md §1/6: `<pad>` appended, its rows = mean of the others
        pad = llm_cfg.vocab_size
        for key in ("model.embed_tokens.weight", "lm_head.weight"):
            if key in llama_tensors:
                llama_tensors = {**llama_tensors, key: GrownRows(llama_tensors[key], 1)}
        llm_cfg = llm_cfg.replace(vocab_size=llm_cfg.vocab_size + 1)
        notes.append(f"vocabulary grown to {llm_cfg.vocab_size}: <pad> = {pad}, its embed_tokens and lm_head rows "
                     f"set to the mean row")
    clash = sorted(set(tensors) & set(llama_tensors))
    if clash:
        raise ConversionError(f"the CLIP and Llama directories both hold {listing(clash)}")
    tensors.update(llama_tensors)
    dem_cfg = dem_config(adapter_json, adapter_tensors, vision_cfg)
    config = InfLlavaConfig(vision=vision_cfg, llm=llm_cfg, dem=dem_cfg, pad_token_id=pad)
    llm_dtype = pick_dtype(dtype, llama_tensors.get("model.embed_tokens.weight"))
    dem_anchor = adapter_tensors.get("model.spatial_embed.ln_fuse.weight")
    config = with_dtypes(config, pick_dtype(dtype, tensors.get(RELEASED_VISION_PREFIX + vision.ANCHOR_KEY)),
                         llm_dtype, pick_dtype(dtype, dem_anchor, default=llm_dtype))
    rows = released_rows(config)
    if adapter is not None:
        tensors.update(adapter_tensors)
        kind = "lora" if lora_files.is_lora_dir(adapter) else "stage2-start"
        notes.append(adapter_note)
    else:
        tensors.update(fresh_tensors(config, rows, seed))
        kind = "stage1-start"
        notes.append(f"DEM and projector freshly initialised (PyTorch defaults, seed {seed})")
    return Source(kind, config, rows, tensors, released_ignore(config), notes)


def _adapter(adapter: Path | None, llama_tensors: dict[str, Tensor]):
    """(Llama tensors, DEM + projector tensors, the adapter's config.json or {}, a note) of a
    stage-1 adapter (mm_projector.bin) or a LoRA directory (its adapters merged into the Llama)."""
    if adapter is None:
        return llama_tensors, {}, {}, ""
    cfg_json = read_config(adapter) if adapter.is_dir() and (adapter / "config.json").is_file() else {}
    if lora_files.is_lora_dir(adapter):
        merged, trainables, note = lora_files.read(adapter, llama_tensors)
        return merged, trainables, cfg_json, note
    return llama_tensors, open_weights(_adapter_file(adapter)), cfg_json, f"DEM and projector from {_adapter_file(adapter)}"


def fresh_tensors(config: InfLlavaConfig, rows, seed: int) -> dict[str, Tensor]:
    """PyTorch-default initialisation of the DEM and projector tensors, released key names."""
    from infllava_jax.params import abstract_params
    specs = {"/".join(str(getattr(k, "key", k)) for k in p): s for p, s in
             jax.tree_util.tree_flatten_with_path(abstract_params(config))[0]}
    out = {}
    for r in rows:
        if not r.path.startswith(("spatial_embed/", "mm_projector/")):
            continue
        shape = r.torch_shape(specs[r.path].shape)
        parent = r.path.rsplit("/", 1)[0]
        if r.path.endswith("/scale"):
            out[r.key] = InitTensor(r.key, shape, "ones", seed=seed)
        elif r.path.endswith("/bias") and parent + "/scale" in specs:
            out[r.key] = InitTensor(r.key, shape, "zeros", seed=seed)
        else:   # Linear weight [out, in] and bias: fan_in = in
            fan_in = specs[parent + "/kernel"].shape[0]
            out[r.key] = InitTensor(r.key, shape, "uniform", fan_in=fan_in, seed=seed)
    return out
