"""Task text -> prompt ids, as lmms-eval's llava adapter builds them, and generated ids -> text.

User turn = one "<image>" per image joined by spaces, "\\n", then the task text (no image token
when there is no image); wrapped in the checkpoint's conversation template with an open
assistant turn (conversation.py decides: `llama3` or LLaVA-1.5's `vicuna_v1`, doubled BOS or
not). Outputs are decoded with special tokens skipped, then stripped.
"""
from __future__ import annotations

import numpy as np

from infllava_jax import conversation
from infllava_jax.conversation import Usage, decode, user_text  # noqa: F401  (re-exported)


def encode(tokenizer, text: str, num_images: int, *, double_bos: bool = False, template: str = "llama3",
           usage: Usage | None = None) -> np.ndarray:
    """Prompt ids with IMAGE_TOKEN_INDEX (-200) per image, in `usage`'s template (else `template`
    with `double_bos`). double_bos=True reproduces the released LLaVA loader
    (`tokenizer_image_token` keeps the tokenizer's BOS in front of the template's own
    `<|begin_of_text|>`)."""
    usage = usage or Usage(template=template, double_bos=double_bos)
    return conversation.encode_prompt(tokenizer, text, num_images, usage)


def get_tokenizer(spec: str, ckpt: str | None, vocab_size: int, usage: Usage | None = None):
    """`spec`: "" = as the checkpoint records (its tokenizer files, or the tiny one for checkpoints
    that recorded it); "tiny" = the built-in tiny tokenizer; otherwise a directory. No tokenizer
    found: an InputError saying to pass one."""
    usage = usage or (conversation.read_usage(ckpt) if ckpt is not None else Usage())
    return conversation.tokenizer_for(ckpt, usage, vocab_size, spec)
