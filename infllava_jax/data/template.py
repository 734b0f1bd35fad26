"""Conversation templates (docs/model.md section 6): LLaVA turns -> (input_ids, labels).

`llama3` (stage 2), as the released `conv_llama3` renders it:

    <|begin_of_text|><|start_header_id|>system<|end_header_id|>\\n\\n{SYSTEM}<|eot_id|>
    <|start_header_id|>user<|end_header_id|>\\n\\n<image>\\n{question}<|eot_id|>
    <|start_header_id|>assistant<|end_header_id|>\\n\\n{answer}<|eot_id|>   (user/assistant repeat)

(one line in reality). `system=None` leaves the system turn out (BOS, then the first user
turn), as Llama-3's own chat template renders a conversation without a system message
(`data.system_prompt=false`; the study's tiny model). Loss only on each answer and its trailing
`<|eot_id|>`; everything up to and including each assistant header is IGNORE_INDEX. `plain`
(stage 1): BOS, `<image>`, caption + "\\n"; the human text is dropped and the loss covers
caption + "\\n" (released `preprocess_plain` masks only BOS and the image; with Llama-3's split
regex a final "." and the "\\n" often are one token, so "caption only" could not be cut at a
token boundary anyway).

`<image>` becomes the single id IMAGE_TOKEN_INDEX (-200); text is never tokenised across it.
Each piece of text lies between special tokens or `<image>`, so tokenising piece by piece gives
the ids of tokenising the whole string (special tokens split the text before BPE), except
when an answer starts with a newline (Llama-3's regex then joins it with the header's "\\n\\n";
the released mask was misaligned there too).

Doubled BOS: the template text starts with `<|begin_of_text|>` and the released code tokenised
it with the tokenizer's default add_special_tokens=True, which prepends another one (Llama-3's
post-processor), so released training and inference saw two BOS. We tokenise with
add_special_tokens=False (one BOS); `double_bos=True` reproduces the released ids.
"""
from __future__ import annotations

import numpy as np

from infllava_jax.data.tokenizer import BOS, END_HEADER, EOT, START_HEADER, special_id
from infllava_jax.splice import IGNORE_INDEX, IMAGE_TOKEN_INDEX

IMAGE_TOKEN = "<image>"
SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
          "The assistant gives helpful, detailed, and polite answers to the user's questions.")
USER = "user"
ASSISTANT = "assistant"
_ROLES = {"human": USER, "user": USER, "gpt": ASSISTANT, "assistant": ASSISTANT}
TEMPLATES = ("llama3", "plain")


class TemplateError(ValueError):
    """A conversation the template cannot encode; `reason` is a bad-sample counter key."""

    def __init__(self, reason: str, msg: str):
        super().__init__(msg)
        self.reason = reason


def header(role: str) -> str:
    return f"{START_HEADER}{role}{END_HEADER}\n\n"


def system_text(system: str | None = SYSTEM) -> str:
    """BOS and the system turn; system=None: BOS alone (no system turn)."""
    return BOS if system is None else f"{BOS}{header('system')}{system}{EOT}"


# ----------------------------------------------------------------------------- turns

def normalize_turns(conversations, num_images: int) -> list[tuple[str, str]]:
    """LLaVA `conversations` -> [(user, assistant), ...] pairs, validated.

    As released: a leading non-human turn is dropped; in a one-image sample the `<image>` is
    moved to the front of its turn as "<image>\\n" + rest.strip() (`preprocess_multimodal`).
    Ours: exactly one `<image>` per image (none in a text-only sample); with several images the
    tags stay where the text puts them (the k-th tag is the k-th image); a trailing unanswered
    question is dropped (released: its mismatch check zeroed the whole sample).
    """
    if not isinstance(conversations, list) or not conversations:
        raise TemplateError("bad_fields", "'conversations' must be a non-empty list")
    turns = []
    for t in conversations:
        if not (isinstance(t, dict) and isinstance(t.get("value"), str) and isinstance(t.get("from"), str)
                and t["from"] in _ROLES):
            raise TemplateError("bad_fields", f"bad turn {str(t)[:80]!r}")
        turns.append((_ROLES[t["from"]], t["value"]))
    n_img = sum(v.count(IMAGE_TOKEN) for _, v in turns)
    if n_img != num_images:
        raise TemplateError("image_token_mismatch",
                            f"{n_img} '{IMAGE_TOKEN}' in a sample with {num_images} image(s)")
    if turns[0][0] != USER:
        turns = turns[1:]
    if num_images == 1:
        turns = [(r, (IMAGE_TOKEN + "\n" + v.replace(IMAGE_TOKEN, "").strip()).strip()
                  if IMAGE_TOKEN in v else v) for r, v in turns]
    if sum(v.count(IMAGE_TOKEN) for _, v in turns) != num_images:
        raise TemplateError("image_token_mismatch", f"'{IMAGE_TOKEN}' in a dropped turn")
    if len(turns) % 2:
        turns = turns[:-1]
    if not turns:
        raise TemplateError("no_answer", "no assistant turn")
    for j, (role, _) in enumerate(turns):
        if role != (USER, ASSISTANT)[j % 2]:
            raise TemplateError("bad_roles", "turns do not alternate user/assistant")
    return [(turns[j][1], turns[j + 1][1]) for j in range(0, len(turns), 2)]


# ----------------------------------------------------------------------------- text

def build_prompt(question: str, with_image: bool = True, system: str | None = SYSTEM) -> str:
    """Generation prompt: system, one user turn ("<image>\\n" + question), open assistant header."""
    q = f"{IMAGE_TOKEN}\n{question}" if with_image else question
    return f"{system_text(system)}{header(USER)}{q}{EOT}{header(ASSISTANT)}"


# ----------------------------------------------------------------------------- ids

def tokenize(text: str, tokenizer) -> list[int]:
    """Text -> ids with each `<image>` as IMAGE_TOKEN_INDEX; never adds special tokens."""
    ids: list[int] = []
    for k, chunk in enumerate(text.split(IMAGE_TOKEN)):
        if k:
            ids.append(IMAGE_TOKEN_INDEX)
        if chunk:
            ids.extend(_encode(tokenizer, chunk))
    return ids


def _encode(tokenizer, text: str) -> list[int]:
    backend = getattr(tokenizer, "backend_tokenizer", None)  # the Rust tokenizer: thread-safe, no state
    if backend is not None:
        return backend.encode(text, add_special_tokens=False).ids
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_conversation(conversations, tokenizer, *, has_image: bool | None = None, num_images: int | None = None,
                        template: str = "llama3", double_bos: bool = False, system: str | None = SYSTEM):
    """LLaVA `conversations` -> (input_ids, labels), int32 arrays of equal length (unshifted:
    labels[i] is the target of position i's token, as in HF; the loss shifts).
    `num_images` (or `has_image`: 1 or 0) `<image>` tags must be in the text; system=None: no
    system turn (llama3 only).

    Raises TemplateError (with a bad-sample `reason`) for conversations that cannot be encoded.
    """
    if num_images is None:
        num_images = int(bool(has_image))
    if template == "plain":
        return _encode_plain(conversations, tokenizer, num_images)
    if template != "llama3":
        raise ValueError(f"template must be one of {TEMPLATES}, got {template!r}")
    pairs = normalize_turns(conversations, num_images)
    # (text, supervised) pieces; boundaries sit at special tokens, so ids are exact (see top)
    pieces = [(system_text(system), False)]
    for q, a in pairs:
        pieces += [(f"{header(USER)}{q}{EOT}{header(ASSISTANT)}", False), (f"{a}{EOT}", True)]
    ids, labels = [], []
    if double_bos:
        ids, labels = [special_id(tokenizer, BOS)], [IGNORE_INDEX]
    for text, supervised in pieces:
        piece = tokenize(text, tokenizer)
        ids += piece
        labels += piece if supervised else [IGNORE_INDEX] * len(piece)
    return np.asarray(ids, np.int32), np.asarray(labels, np.int32)


def _encode_plain(conversations, tokenizer, num_images: int):
    """Stage 1: [BOS, IMAGE] + caption + "\\n"; BOS and image masked (released preprocess_plain)."""
    if num_images != 1:
        raise TemplateError("image_token_mismatch", f"the plain template needs one image, not {num_images}")
    if not (isinstance(conversations, list) and len(conversations) == 2
            and all(isinstance(t, dict) and isinstance(t.get("value"), str) for t in conversations)):
        raise TemplateError("bad_fields", "the plain template needs exactly two turns")
    if conversations[0]["value"].count(IMAGE_TOKEN) != 1 or IMAGE_TOKEN in conversations[1]["value"]:
        raise TemplateError("image_token_mismatch", f"plain: one '{IMAGE_TOKEN}' in the first turn")
    caption = tokenize(conversations[1]["value"] + "\n", tokenizer)
    ids = [special_id(tokenizer, BOS), IMAGE_TOKEN_INDEX] + caption
    labels = [IGNORE_INDEX, IGNORE_INDEX] + caption
    return np.asarray(ids, np.int32), np.asarray(labels, np.int32)
