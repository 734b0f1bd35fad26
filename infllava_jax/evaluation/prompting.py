"""Task text -> prompt ids, as lmms-eval's llava adapter builds them, and generated ids -> text.

User turn = one "<image>" per image joined by spaces, "\\n", then the task text (no image token
when there is no image); wrapped in the `llama3` conversation template (data/template.py) with an
open assistant header. Outputs are decoded with special tokens skipped, then stripped.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from infllava_jax.data import template
from infllava_jax.data.tokenizer import BOS, build_tiny_tokenizer, load_tokenizer, special_id

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def user_text(text: str, num_images: int) -> str:
    if num_images <= 0:
        return text
    return " ".join([template.IMAGE_TOKEN] * num_images) + "\n" + text


def encode(tokenizer, text: str, num_images: int, *, double_bos: bool = False) -> np.ndarray:
    """Prompt ids with IMAGE_TOKEN_INDEX (-200) per image. double_bos=True reproduces the
    released LLaVA loader (`tokenizer_image_token` keeps the tokenizer's BOS in front of the
    template's own `<|begin_of_text|>`)."""
    ids = template.tokenize(template.build_prompt(user_text(text, num_images), with_image=False), tokenizer)
    if double_bos:
        ids = [special_id(tokenizer, BOS)] + ids
    return np.asarray(ids, np.int32)


def decode(tokenizer, tokens) -> str:
    return tokenizer.decode([int(t) for t in tokens], skip_special_tokens=True).strip()


def get_tokenizer(spec: str, ckpt: str | None, vocab_size: int):
    """`spec`: "" = the checkpoint directory's tokenizer files (else the tiny one when the model's
    vocabulary is tiny-sized); "tiny" = the built-in tiny tokenizer; otherwise a directory."""
    if spec == "tiny":
        return build_tiny_tokenizer(vocab_size)
    if spec:
        return load_tokenizer(spec)
    if ckpt is not None and any((Path(ckpt) / f).is_file() for f in TOKENIZER_FILES):
        return load_tokenizer(str(ckpt))
    if vocab_size <= 4096:
        return build_tiny_tokenizer(vocab_size)
    raise FileNotFoundError(f"{ckpt}: no tokenizer files ({', '.join(TOKENIZER_FILES)}); pass "
                            f"--config.tokenizer=DIR (a local Llama-3 tokenizer)")
