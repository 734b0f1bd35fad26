"""Offline tokenizer directories laid out like real downloads (built with the `tokenizers` library).

- `llama3_tokenizer_dir`: as meta-llama/Meta-Llama-3-8B-Instruct: byte-level BPE with Llama-3's
  split regex, the special tokens after the ordinary vocabulary in Llama-3's order
  (<|begin_of_text|>, <|end_of_text|>, reserved 0-3, <|start_header_id|>, <|end_header_id|>,
  reserved 4, <|eot_id|>), a BOS post-processor, no pad token; tokenizer.json,
  tokenizer_config.json with the Llama-3 chat template, special_tokens_map.json,
  generation_config.json with eos_token_id [<|end_of_text|>, <|eot_id|>].
- `vicuna_tokenizer_dir`: as llava-hf/llava-1.5-7b-hf: a LLaMA/sentencepiece-style BPE
  (<unk>, <s>, </s> = 0, 1, 2; "▁" word prefix, byte fallback), "<s> $A" post-processor,
  <image> and <pad> added after the vocabulary (added_tokens.json), tokenizer_config.json with
  LLaVA's chat template, special_tokens_map.json, generation_config.json (eos 2).
- `sentencepiece_tokenizer_dir`: as liuhaotian/llava-v1.5-7b: only a sentencepiece
  tokenizer.model (BPE, byte fallback, <unk> <s> </s> = 0 1 2), tokenizer_config.json
  (LlamaTokenizer), special_tokens_map.json (pad = <unk>), generation_config.json.
Each returns the tokenizer's length (the vocabulary a matching model needs).
"""
from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from infllava_jax.data.tokenizer import LLAMA3_SPLIT, _CORPUS

LLAMA3_SPECIALS = ("<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                   "<|reserved_special_token_1|>", "<|reserved_special_token_2|>", "<|reserved_special_token_3|>",
                   "<|start_header_id|>", "<|end_header_id|>", "<|reserved_special_token_4|>", "<|eot_id|>")
LLAMA3_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}"
    "{% endfor %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")


def _corpus() -> list[str]:
    from infllava_jax.conversation import VICUNA_SYSTEM
    extra = [VICUNA_SYSTEM, "USER: <image>\nWhat is in the image? ASSISTANT: A cat.</s>",
             "ABCDEFGHIJKLMNOPQRSTUVWXYZ abcdefghijklmnopqrstuvwxyz 0123456789"]
    return ([line for line in _CORPUS.splitlines() if line] + extra) * 4


def _save(tok: Tokenizer, d: Path, config: dict, special_map: dict, generation: dict, **kw) -> int:
    d.mkdir(parents=True, exist_ok=True)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **kw)
    fast.save_pretrained(d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg.update(config)
    (d / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))
    (d / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2))
    (d / "generation_config.json").write_text(json.dumps(generation, indent=2))
    return len(fast)


def llama3_tokenizer_dir(d: Path, ordinary: int = 400) -> int:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(_corpus(), trainers.BpeTrainer(vocab_size=ordinary, show_progress=False,
                                                           initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.add_special_tokens(list(LLAMA3_SPECIALS))
    bos = tok.token_to_id(LLAMA3_SPECIALS[0])
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{LLAMA3_SPECIALS[0]} $A", pair=f"{LLAMA3_SPECIALS[0]} $A {LLAMA3_SPECIALS[0]} $B",
                                      special_tokens=[(LLAMA3_SPECIALS[0], bos)])])
    eos, eot = tok.token_to_id("<|end_of_text|>"), tok.token_to_id("<|eot_id|>")
    return _save(tok, Path(d), {"chat_template": LLAMA3_CHAT_TEMPLATE, "model_max_length": 1000000000000000019884624838656},
                 {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"},
                 {"bos_token_id": bos, "eos_token_id": [eos, eot], "do_sample": True, "temperature": 0.6, "top_p": 0.9},
                 bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")


def vicuna_tokenizer_dir(d: Path, ordinary: int = 300) -> int:
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.train_from_iterator(_corpus(), trainers.BpeTrainer(vocab_size=ordinary, show_progress=False,
                                                           special_tokens=["<unk>", "<s>", "</s>"]))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    n = tok.get_vocab_size()
    tok.add_special_tokens(["<image>", "<pad>"])
    n_total = _save(tok, Path(d), {"tokenizer_class": "LlamaTokenizer", "chat_template": LLAVA_CHAT_TEMPLATE,
                                   "legacy": False, "padding_side": "left"},
                    {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"},
                    {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": n + 1},
                    bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>")
    (Path(d) / "added_tokens.json").write_text(json.dumps({"<image>": n, "<pad>": n + 1}))
    return n_total


def sentencepiece_tokenizer_dir(d: Path, vocab_size: int = 420) -> int:
    import sentencepiece as spm
    d = Path(d)
    d.mkdir(parents=True, exist_ok=True)
    (d / "corpus.txt").write_text("\n".join(_corpus()))
    spm.SentencePieceTrainer.train(input=str(d / "corpus.txt"), model_prefix=str(d / "tokenizer"),
                                   vocab_size=vocab_size, model_type="bpe", byte_fallback=True, unk_id=0, bos_id=1,
                                   eos_id=2, pad_id=-1, add_dummy_prefix=True, normalization_rule_name="identity",
                                   minloglevel=2)
    (d / "corpus.txt").unlink()
    (d / "tokenizer.vocab").unlink()
    (d / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
         "pad_token": None, "add_bos_token": True, "add_eos_token": False, "legacy": False,
         "model_max_length": 2048, "padding_side": "right"}, indent=2))
    (d / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<unk>", "unk_token": "<unk>"}, indent=2))
    (d / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}))
    return vocab_size


def llava_hf_dir(d: Path, tok_dir: Path, n_tokens: int, seed: int = 7):
    """llava-hf/llava-1.5-7b-hf as downloaded: a tiny random LlavaForConditionalGeneration
    (save_pretrained), the Vicuna tokenizer files of `tok_dir`, preprocessor_config.json; the
    vocabulary padded beyond the tokenizer as llava-hf's is. Returns (our config, torch model)."""
    import torch
    import transformers
    from infllava_jax import conversation, presets
    from tests.test_convert import hf_vision_config, randomize_
    cfg = presets.tiny(grid=None, vocab_size=n_tokens + 2)
    image_id = json.loads((Path(tok_dir) / "added_tokens.json").read_text())["<image>"]
    lc = transformers.LlavaConfig(vision_config=transformers.CLIPVisionConfig(**hf_vision_config(cfg)),
                                  text_config=transformers.LlamaConfig(**cfg.llm.to_hf()), image_token_index=image_id,
                                  vision_feature_layer=-2, vision_feature_select_strategy="default",
                                  projector_hidden_act="gelu")
    torch.manual_seed(0)
    model = randomize_(transformers.LlavaForConditionalGeneration(lc), seed=seed)
    model.save_pretrained(d)
    conversation.copy_tokenizer_files(tok_dir, d)
    (Path(d) / "preprocessor_config.json").write_text(json.dumps({"crop_size": {"height": 84, "width": 84}}))
    return cfg, model
