"""How a checkpoint is used: its conversation template, stop ids, tokenizer and input preparation.

The one place that decides these (docs/using.md); the chat, eval.py, the lmms-eval adapter and
`InfLlava.generate` / `prepare` / `chat` all read a checkpoint's `Usage`. It is recorded next to
config.json as `usage.json` by `python -m convert` (from the model family and the source's
tokenizer files) and by training's `final/` (what training used):

    template    "llama3"     INF-LLaVA, the stage-1/2 starts, our training (docs/model.md §6)
                "vicuna_v1"  LLaVA-1.5: "{SYSTEM} USER: <image>\\nQ ASSISTANT:", stop on </s>
    stop_ids    generation stops on any of these ids ([] = the template's stop tokens in the tokenizer)
    tokenizer   "files": the checkpoint's own tokenizer files; "tiny": the built-in tiny BPE
                (data/tokenizer.py); "": none recorded (pass one: --tokenizer DIR)
    pixels      "released": images at the sub-image size s, upsampled to n*s in the model (the
                released inference path); "native": preprocessed straight to n*s (our training)
    image_mode  "pad" (expand to square with the mean colour) | "square" (centre crop)
    double_bos  a second BOS in front of the prompt (the released loader's doubled BOS)
    system_prompt  false: the prompt has no system turn / text (a model trained without it:
                data.system_prompt=false, the study's)

A checkpoint without usage.json (written before it existed) reads as the released INF-LLaVA
defaults: llama3, its tokenizer files, released pixels, pad, doubled BOS.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np

from infllava_jax.data import template as llama3_template
from infllava_jax.data.tokenizer import BOS, END_HEADER, EOS, EOT, START_HEADER, build_tiny_tokenizer, load_tokenizer
from infllava_jax.errors import InputError

USAGE_FILE = "usage.json"
# What real downloads hold (meta-llama/Meta-Llama-3-8B-Instruct, llava-hf/llava-1.5-7b-hf,
# liuhaotian/llava-v1.5-7b): copied into a converted checkpoint when present.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.jinja", "chat_template.json", "generation_config.json")
VOCAB_FILES = ("tokenizer.json", "tokenizer.model")    # a directory with one of these has a tokenizer

TEMPLATES = ("llama3", "vicuna_v1")
VICUNA_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the human's questions.")
STOP_TOKENS = {"llama3": (EOT, EOS), "vicuna_v1": ("</s>",)}
TEMPLATE_TOKENS = {"llama3": (BOS, EOS, START_HEADER, END_HEADER, EOT), "vicuna_v1": ("<s>", "</s>")}
PIXELS, IMAGE_MODES, TOKENIZERS = ("released", "native"), ("pad", "square"), ("files", "tiny", "")


@dataclasses.dataclass(frozen=True)
class Usage:
    template: str = "llama3"
    stop_ids: tuple[int, ...] = ()
    tokenizer: str = "files"
    pixels: str = "released"
    image_mode: str = "pad"
    double_bos: bool = True
    system_prompt: bool = True

    def __post_init__(self):
        for name, allowed in (("template", TEMPLATES), ("tokenizer", TOKENIZERS), ("pixels", PIXELS),
                              ("image_mode", IMAGE_MODES)):
            if getattr(self, name) not in allowed:
                raise InputError(f"{name}={getattr(self, name)!r}: expected one of {', '.join(map(repr, allowed))}")
        object.__setattr__(self, "stop_ids", tuple(int(s) for s in self.stop_ids))
        for name in ("double_bos", "system_prompt"):
            object.__setattr__(self, name, as_bool(getattr(self, name), name))

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2) + "\n"

    def override(self, **kw) -> "Usage":
        """Fields given as None or "" keep the recorded value (a flag left at its default)."""
        kw = {k: v for k, v in kw.items() if v is not None and v != ""}
        if "template" in kw and kw["template"] != self.template and "stop_ids" not in kw:
            kw["stop_ids"] = ()    # the other template's stop tokens, looked up in the tokenizer
        return dataclasses.replace(self, **kw)


def as_bool(v, name: str = "value") -> bool:
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    s = str(v).strip().lower()
    if s in ("1", "true", "yes"):
        return True
    if s in ("0", "false", "no"):
        return False
    raise InputError(f"{name}={v!r}: expected true or false")


# ----------------------------------------------------------------------------- reading / writing

def read_usage(ckpt) -> Usage:
    """The Usage recorded in CKPT/usage.json (or the released defaults when there is none)."""
    f = Path(ckpt) / USAGE_FILE
    if not f.is_file():
        return Usage()
    try:
        d = json.loads(f.read_text())
        unknown = sorted(set(d) - {fl.name for fl in dataclasses.fields(Usage)})
        if unknown:
            raise InputError(f"unknown field(s) {unknown}")
        return Usage(**d)
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError, InputError) as e:
        raise InputError(f"{f}: {e}") from None


def write_usage(directory, usage: Usage, tokenizer_dir=None) -> None:
    """usage.json, plus the tokenizer files of `tokenizer_dir` (when usage.tokenizer == "files")."""
    directory = Path(directory)
    if usage.tokenizer == "files" and tokenizer_dir is not None:
        copy_tokenizer_files(tokenizer_dir, directory)
    (directory / USAGE_FILE).write_text(usage.to_json())


def has_tokenizer(directory) -> bool:
    return directory is not None and any((Path(directory) / f).is_file() for f in VOCAB_FILES)


def find_tokenizer_dir(candidates) -> Path | None:
    """The first directory (of SRC, --llm, ...) that holds tokenizer files; None if none does."""
    for d in candidates:
        if d is not None and Path(d).is_dir() and has_tokenizer(d):
            return Path(d)
    return None


def copy_tokenizer_files(src, dst) -> list[str]:
    copied = []
    for name in TOKENIZER_FILES:
        if (Path(src) / name).is_file() and Path(src).resolve() != Path(dst).resolve():
            shutil.copyfile(Path(src) / name, Path(dst) / name)
            copied.append(name)
    return copied


def generation_eos_ids(directory) -> tuple[int, ...]:
    """eos_token_id of DIR/generation_config.json (an int or a list), () if absent."""
    f = None if directory is None else Path(directory) / "generation_config.json"
    if f is None or not f.is_file():
        return ()
    try:
        eos = json.loads(f.read_text()).get("eos_token_id")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return ()
    eos = [eos] if isinstance(eos, int) else eos if isinstance(eos, list) else []
    return tuple(int(e) for e in eos if isinstance(e, int))


# ----------------------------------------------------------------------------- tokenizer

def tokenizer_for(ckpt, usage: Usage, vocab_size: int, spec: str = ""):
    """The tokenizer to use with a checkpoint. spec: "" = as recorded (its files, or "tiny");
    "tiny" = the built-in tiny BPE; otherwise a tokenizer directory."""
    if spec == "tiny" or (not spec and usage.tokenizer == "tiny"):
        return build_tiny_tokenizer(vocab_size)
    where = spec or (ckpt if usage.tokenizer == "files" else None)
    if where is None or not has_tokenizer(where):
        raise InputError(f"{spec or ckpt}: no tokenizer (tokenizer.json or tokenizer.model); pass --tokenizer DIR "
                         f"(the model's tokenizer directory, e.g. the Llama-3 or LLaVA-1.5 download) or "
                         f"--tokenizer tiny for the built-in test tokenizer")
    return load_tokenizer(str(where), template=usage.template)


def template_of(tokenizer) -> str:
    """llama3 if the tokenizer spells Llama-3's header tokens, else vicuna_v1."""
    ids = tokenizer.convert_tokens_to_ids([START_HEADER])
    return "llama3" if ids and ids[0] is not None and ids[0] != tokenizer.unk_token_id else "vicuna_v1"


def stop_ids(usage: Usage, tokenizer=None) -> tuple[int, ...]:
    """The ids generation stops on: the recorded ones, else the template's stop tokens."""
    if usage.stop_ids:
        return usage.stop_ids
    if tokenizer is None:
        raise InputError("no stop ids recorded and no tokenizer to look them up in")
    ids = []
    for t in STOP_TOKENS[usage.template]:
        i = tokenizer.convert_tokens_to_ids(t)
        if i is not None and i != tokenizer.unk_token_id:
            ids.append(int(i))
    if usage.template == "vicuna_v1" and tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    if not ids:
        raise InputError(f"the tokenizer has none of the {usage.template} stop tokens {STOP_TOKENS[usage.template]}")
    return tuple(dict.fromkeys(ids))


# ----------------------------------------------------------------------------- prompts

def user_text(text: str, num_images: int) -> str:
    """One "<image>" per image joined by spaces, "\\n", then the text (LLaVA / lmms-eval)."""
    if num_images <= 0:
        return text
    return " ".join([llama3_template.IMAGE_TOKEN] * num_images) + "\n" + text


def prompt_text(template: str, user: str, system_prompt: bool = True) -> str:
    """The generation prompt of one user turn, ending with the open assistant turn."""
    if template == "llama3":
        return llama3_template.build_prompt(user, with_image=False,
                                            system=llama3_template.SYSTEM if system_prompt else None)
    if template == "vicuna_v1":   # LLaVA conv_vicuna_v1 (sep " ", sep2 "</s>"); BOS added as ids
        return f"{VICUNA_SYSTEM + ' ' if system_prompt else ''}USER: {user} ASSISTANT:"
    raise InputError(f"template={template!r}: expected one of {', '.join(TEMPLATES)}")


def encode_prompt(tokenizer, text: str, num_images: int, usage: Usage) -> np.ndarray:
    """Prompt ids, IMAGE_TOKEN_INDEX (-200) per image. llama3: the template text begins with
    <|begin_of_text|>; vicuna_v1: BOS, then the text (LLaVA's tokenizer_image_token);
    double_bos puts one more BOS in front (the released loader)."""
    ids = llama3_template.tokenize(prompt_text(usage.template, user_text(text, num_images), usage.system_prompt),
                                   tokenizer)
    bos = int(tokenizer.convert_tokens_to_ids(BOS)) if usage.template == "llama3" else tokenizer.bos_token_id
    lead = ([] if usage.template == "llama3" else [bos]) + ([bos] if usage.double_bos else [])
    return np.asarray(lead + ids, np.int32)


def answer_end(template: str) -> str:
    """What closes an assistant answer in the template: llama3 <|eot_id|>, vicuna_v1 </s>."""
    return STOP_TOKENS[template][0]


def decode(tokenizer, tokens) -> str:
    return tokenizer.decode([int(t) for t in tokens], skip_special_tokens=True).strip()


# ----------------------------------------------------------------------------- decisions

def family_usage(has_dem: bool, tokenizer=None, template: str | None = None) -> Usage:
    """What a converted checkpoint records. Template: `template` if given, else the one the
    tokenizer spells (Llama-3 header tokens -> llama3), else by family: INF-LLaVA (DEM) llama3,
    LLaVA-1.5 (no DEM) vicuna_v1. Released INF-LLaVA inference: released pixels, pad, doubled
    BOS; LLaVA-1.5: one BOS."""
    name = template or (template_of(tokenizer) if tokenizer is not None else None)
    name = name or ("llama3" if has_dem else "vicuna_v1")
    return Usage(template=name, double_bos=name == "llama3", tokenizer="files" if tokenizer is not None else "")


def training_usage(tokenizer_spec: str, data_cfg) -> Usage:
    """What training's final/ records: the llama3 template (the only one training encodes), its
    tokenizer (a directory's files, or the tiny one for tokenizer=""), native pixels (training
    preprocesses straight to n*s), the data's image mode, BOS and system turn."""
    files = bool(tokenizer_spec) and tokenizer_spec != "tiny"
    return Usage(template="llama3", tokenizer="files" if files else "tiny", pixels="native",
                 image_mode=data_cfg.image_mode, double_bos=data_cfg.double_bos,
                 system_prompt=data_cfg.system_prompt)
