"""Tokenizers: a tiny Llama-3-like byte-level BPE (trained in ~0.1 s, no download) or a real one.

Both come back as a transformers `PreTrainedTokenizerFast`, so the template code (docs/model.md section 6)
runs unchanged on either. The tiny one copies what matters of Meta-Llama-3's tokenizer.json:
the same pre-tokenizer split regex + byte-level alphabet, the special tokens the `llama3`
template spells out in text, and a post-processor that prepends `<|begin_of_text|>` when
`add_special_tokens=True` (the source of the released code's doubled BOS, see template.py).
Special-token ids differ from the real ones (128000..): stop ids come from conversation.stop_ids.
"""
from __future__ import annotations

import functools

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from infllava_jax.errors import InputError

BOS = "<|begin_of_text|>"
EOS = "<|end_of_text|>"
START_HEADER = "<|start_header_id|>"
END_HEADER = "<|end_header_id|>"
EOT = "<|eot_id|>"
PAD = "<pad>"  # the released training added it (id 128256 in the real vocabulary, docs/model.md §1)
# `<pad>` first so the tiny tokenizer's pad id is 0, as presets.tiny() assumes.
SPECIAL_TOKENS = (PAD, BOS, EOS, START_HEADER, END_HEADER, EOT)

# Meta-Llama-3 tokenizer.json pre-tokenizer pattern (tiktoken cl100k-style).
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

_CORPUS = """\
A chat between a curious user and an artificial intelligence assistant. The assistant gives
helpful, detailed, and polite answers to the user's questions.
What is in the image? Describe the image in detail. What color is the cat? How many people are
there? The picture shows a woman in a space suit holding a helmet, with a flag behind her.
A cup of coffee on a saucer, seen from above, on a wooden table. A tabby cat lying on a rug.
A rocket standing on the launch pad under a clear blue sky. A man with a camera on a tripod.
Where is this photo taken? It looks like a kitchen, a street, a park, a beach or an office.
Answer the question using a single word or phrase. Yes. No. Two. Red, green, blue, white, black.
The quick brown fox jumps over the lazy dog. 0123456789 + - * / = ( ) [ ] { } < > . , ; : ! ? ' "
Please explain step by step. First, second, third, finally. Thank you! You're welcome.
A red box with the digit 5 and a blue circle with 3 dots. The box is left of the circle.
The tiny x is in the top left corner, top right, bottom left or bottom right. Describe the image.
What digit is written in the box? Which digit is inside the box? A green, orange or purple box.
How many dots are inside the circle? How many small dots are in the circle? Which corner holds
the tiny x? In which corner is the small x mark? Is the box left or right of the circle? Is the
box on the left or the right of the circle?
"""
# Text in every training sample (the llama3 system prompt, the short-answer instruction, the
# synthetic set's words) counts this many times more, as it would in a tokenizer trained on the
# data: BPE then spends its merges on it, and a 4-question record fits 192 tokens.
_FREQUENT = """\
A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, detailed, and polite answers to the user's questions.
Answer the question using a single word or phrase.
Describe the image.
A red box with the digit 5 and a blue circle with 3 dots. The box is left of the circle. The tiny x is in the top left corner.
A green, orange or purple box with the digit 0, 2, 3, 6 or 9 and 4 dots. The tiny x is in the bottom right corner.
What digit is written in the box?
Which digit is inside the box?
How many dots are inside the circle?
How many small dots are in the circle?
Which corner holds the tiny x?
In which corner is the small x mark?
Is the box left or right of the circle?
Is the box on the left or the right of the circle?
left
right
top left
top right
bottom left
bottom right
"""
_FREQUENT_WEIGHT = 8


@functools.lru_cache(maxsize=8)
def _tiny_json(vocab_size: int, texts: tuple[str, ...] | None) -> str:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  min_frequency=1, show_progress=False)
    lines = _CORPUS.splitlines() + _FREQUENT.splitlines() * _FREQUENT_WEIGHT
    corpus = list(texts) if texts is not None else [  # role + "\n\n" + text, as in the template
        f"{role}\n\n{line}" for role in ("system", "user", "assistant") for line in lines]
    tok.train_from_iterator(corpus, trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.Sequence([  # as Llama-3: BOS prepended when add_special_tokens
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                      special_tokens=[(BOS, bos_id)])])
    return tok.to_str()


def build_tiny_tokenizer(vocab_size: int = 512, texts=None) -> PreTrainedTokenizerFast:
    """Byte-level BPE with the Llama-3 split regex and special tokens; deterministic, no download.

    vocab_size counts the 6 special tokens and the 256 byte symbols (so >= 262)."""
    if vocab_size < len(SPECIAL_TOKENS) + 256:
        raise ValueError(f"vocab_size must be >= {len(SPECIAL_TOKENS) + 256}, got {vocab_size}")
    js = _tiny_json(int(vocab_size), None if texts is None else tuple(texts))
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(js), bos_token=BOS,
                                   eos_token=EOT, pad_token=PAD, padding_side="right",
                                   model_max_length=1 << 30)


def load_tokenizer(path: str | None = None, vocab_size: int = 512, template: str | None = None):
    """`None` or "tiny" -> the tiny tokenizer; else a local HF tokenizer directory (offline):
    tokenizer.json (any transformers tokenizer), or only a sentencepiece tokenizer.model
    (LLaVA-1.5's original files; converted by transformers).

    `template` ("llama3" | "vicuna_v1"; None: llama3 when the tokenizer has Llama-3's header
    tokens) decides which special tokens must exist. llama3: adds `<pad>` when there is no pad
    token, as the released training did (vocabulary 128256 -> 128257); vicuna_v1: pads with
    `<unk>` (LLaVA-1.5) when there is none, the vocabulary unchanged."""
    if path is None or path == "tiny":
        return build_tiny_tokenizer(vocab_size)
    tok = _from_directory(path)
    has_header = tok.convert_tokens_to_ids(START_HEADER) not in (None, tok.unk_token_id)
    template = template or ("llama3" if has_header else "vicuna_v1")
    if template == "llama3" and tok.pad_token is None:
        tok.add_special_tokens({"pad_token": PAD})
    if template != "llama3" and tok.pad_token is None:
        tok.pad_token = tok.unk_token or tok.eos_token
    need = SPECIAL_TOKENS[1:] if template == "llama3" else (tok.bos_token, tok.eos_token)
    kind = "Llama-3" if template == "llama3" else "LLaMA/Vicuna"
    for t in need:
        ids = tok.convert_tokens_to_ids([t]) if t is not None else []
        if len(ids) != 1 or ids[0] is None or ids[0] == tok.unk_token_id:
            raise InputError(f"tokenizer at {path!r} has no {'BOS/EOS' if t is None else repr(t)} special token: "
                             f"not a {kind} tokenizer (template {template})")
    return tok


def _from_directory(path: str):
    from pathlib import Path
    from transformers import AutoTokenizer
    d = Path(path)
    if not d.is_dir():
        raise InputError(f"tokenizer {path!r}: no such directory")
    try:
        if (d / "tokenizer.json").is_file():
            return PreTrainedTokenizerFast.from_pretrained(path, local_files_only=True, padding_side="right")
        if (d / "tokenizer.model").is_file():
            return AutoTokenizer.from_pretrained(path, local_files_only=True, padding_side="right")
    except (OSError, ValueError, TypeError, ImportError) as e:
        raise InputError(f"tokenizer at {path!r} cannot be read: {str(e).strip().splitlines()[0][:300]}") from None
    raise InputError(f"{path}: no tokenizer.json or tokenizer.model")


def special_id(tokenizer, token: str) -> int:
    return int(tokenizer.convert_tokens_to_ids(token))
