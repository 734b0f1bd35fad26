"""Tokenizer and templates (docs/model.md section 6): exact strings, loss masks, released-code parity."""
import copy

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from infllava_jax.data.template import (ASSISTANT, SYSTEM, USER, TemplateError, build_prompt, encode_conversation,
                                        header, normalize_turns, system_text)
from infllava_jax.conversation import Usage, stop_ids as usage_stop_ids
from infllava_jax.data.tokenizer import BOS, EOS, EOT, SPECIAL_TOKENS, build_tiny_tokenizer, load_tokenizer
from infllava_jax.evaluation.prompting import encode
from infllava_jax.splice import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from tests.test_data_common import CLEAN, _conv, tok  # noqa: F401  (fixture)


def stop_ids(tokenizer):
    return usage_stop_ids(Usage(), tokenizer)   # the llama3 template's stop tokens

# docs/model.md section 6, verbatim
SPEC_TEMPLATE = ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nA chat between a curious user "
                 "and an artificial intelligence assistant. The assistant gives helpful, detailed, and polite "
                 "answers to the user's questions.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n<image>\n"
                 "{question}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n{answer}<|eot_id|>")


# ----------------------------------------------------------------------------- the released code, ported
# INF_llava/mm_utils.py tokenizer_image_token and train/train.py preprocess_llama3 / preprocess_plain,
# lists instead of tensors; the tokenizer is called with its defaults (so it prepends BOS).

def released_tokenizer_image_token(prompt, tokenizer):
    chunks = [tokenizer(c).input_ids for c in prompt.split("<image>")]
    ids, offset = [], 0
    if chunks and chunks[0] and chunks[0][0] == tokenizer.bos_token_id:
        offset = 1
        ids.append(chunks[0][0])
    seps = [[IMAGE_TOKEN_INDEX] * (offset + 1)] * len(chunks)
    for x in [e for pair in zip(chunks, seps) for e in pair][:-1]:
        ids.extend(x[offset:])
    return ids


def released_preprocess_multimodal(source):
    for s in source:
        if "<image>" in s["value"]:
            s["value"] = ("<image>\n" + s["value"].replace("<image>", "").strip()).strip()
    return source


def released_preprocess_llama3(source, tokenizer, has_image):
    system = "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n" + SYSTEM
    roles = {"human": "<|start_header_id|>user<|end_header_id|>\n\n",
             "gpt": "<|start_header_id|>assistant<|end_header_id|>\n\n"}
    sep = "<|eot_id|>"
    if source[0]["from"] != "human":
        source = source[1:]
    conversation = system + sep + "".join(roles[s["from"]] + s["value"] + sep for s in source)
    enc = (lambda t: released_tokenizer_image_token(t, tokenizer)) if has_image else (lambda t: tokenizer(t).input_ids)
    input_ids = enc(conversation)
    target = list(input_ids)
    rounds = conversation.split(sep)
    re_rounds = [sep.join(rounds[:3])] + [sep.join(rounds[i:i + 2]) for i in range(3, len(rounds), 2)]
    cur_len, assistant_sep = 0, sep + roles["gpt"]
    for i, rou in enumerate(re_rounds):
        if rou == "":
            break
        parts = rou.split(assistant_sep)
        if len(parts) != 2:
            break
        parts[0] += assistant_sep
        round_len, instruction_len = len(enc(rou)) + 1, len(enc(parts[0]))
        if i > 0:
            round_len, instruction_len = round_len - 1, instruction_len - 1
        target[cur_len:cur_len + instruction_len] = [IGNORE_INDEX] * instruction_len
        cur_len += round_len
    target[cur_len:] = [IGNORE_INDEX] * (len(target) - cur_len)
    assert cur_len == len(input_ids), "released tokenization mismatch"
    return input_ids, target


def released_preprocess_plain(source, tokenizer):
    prompt = "<image>" + source[1]["value"] + "\n"
    ids = released_tokenizer_image_token(prompt, tokenizer)
    n = len(released_tokenizer_image_token("<image>", tokenizer))
    return ids, [IGNORE_INDEX] * n + ids[n:]


# ----------------------------------------------------------------------------- tokenizer

def test_tiny_tokenizer_is_llama3_like(tok):
    assert len(tok) == 512 and tok.pad_token == "<pad>" and tok.pad_token_id == 0
    for t in SPECIAL_TOKENS:  # each special token is one id, recognised inside text
        assert tok(f"a{t}b", add_special_tokens=False).input_ids[1] == tok.convert_tokens_to_ids(t)
    assert tok("hi").input_ids[0] == tok.bos_token_id == tok.convert_tokens_to_ids(BOS)  # BOS prepended
    assert tok("hi", add_special_tokens=False).input_ids[0] != tok.bos_token_id
    assert stop_ids(tok) == (tok.convert_tokens_to_ids(EOT), tok.convert_tokens_to_ids(EOS))
    text = "Héllo wörld 🙂 日本 <|eot_id|> 12345"
    assert tok.decode(tok(text, add_special_tokens=False).input_ids) == text  # byte-level: lossless
    again = build_tiny_tokenizer()
    assert again.backend_tokenizer.to_str() == tok.backend_tokenizer.to_str()
    assert load_tokenizer(None).backend_tokenizer.to_str() == tok.backend_tokenizer.to_str()


def test_load_tokenizer_from_directory(tok, tmp_path):
    # a Llama-3-like tokenizer.json without <pad> stands in for a real Llama-3 directory
    raw = Tokenizer.from_str(tok.backend_tokenizer.to_str())
    specials = [t for t in SPECIAL_TOKENS if t != "<pad>"]
    bare = Tokenizer(models.BPE())
    bare.pre_tokenizer, bare.decoder, bare.post_processor = raw.pre_tokenizer, raw.decoder, None
    bare.train_from_iterator(["hello world"] * 10, trainers.BpeTrainer(
        vocab_size=300, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=bare, bos_token=BOS, eos_token=EOT).save_pretrained(tmp_path)
    loaded = load_tokenizer(str(tmp_path))
    assert loaded.pad_token == "<pad>" and loaded.pad_token_id == len(loaded) - 1 == bare.get_vocab_size()
    assert stop_ids(loaded) == (bare.token_to_id(EOT), bare.token_to_id(EOS))
    ids, labels = encode_conversation(_conv("hello", "world"), loaded, has_image=False)
    assert loaded.decode(labels[labels >= 0]) == "world<|eot_id|>"
    (tmp_path / "tokenizer.json").write_text(Tokenizer(models.BPE()).to_str())
    with pytest.raises(ValueError, match="not a Llama-3 tokenizer"):
        load_tokenizer(str(tmp_path), template="llama3")


# ----------------------------------------------------------------------------- llama3

def test_llama3_text_is_spec_template():
    pairs = normalize_turns(_conv("<image>\nWhat is this?", "A cat."), num_images=1)
    assert llama3_text(pairs) == SPEC_TEMPLATE.format(question="What is this?", answer="A cat.")
    assert build_prompt("What is this?") == SPEC_TEMPLATE.format(question="What is this?", answer="").removesuffix(EOT)


@pytest.mark.parametrize("k", range(len(CLEAN)))
def test_loss_mask_is_answers_and_eot(tok, k):
    rec = CLEAN[k]
    has_image = "image" in rec
    ids, labels = encode_conversation(rec["conversations"], tok, has_image=has_image)
    assert ids.dtype == labels.dtype == np.int32 and ids.shape == labels.shape
    assert ((labels == ids) | (labels == IGNORE_INDEX)).all()
    assert (ids == IMAGE_TOKEN_INDEX).sum() == int(has_image)
    assert (ids == tok.bos_token_id).sum() == 1 and ids[0] == tok.bos_token_id
    # the supervised tokens, segment by segment, decode to exactly the answers + <|eot_id|>
    sup = np.flatnonzero(labels != IGNORE_INDEX)
    segments = np.split(sup, np.flatnonzero(np.diff(sup) > 1) + 1)
    answers = [t["value"] for t in rec["conversations"][1 if rec["conversations"][0]["from"] == "gpt" else 0:]
               if t["from"] == "gpt"]
    assert [tok.decode(ids[s]) for s in segments] == [a + EOT for a in answers]
    # everything before an answer, through its assistant header, is masked
    for s in segments:
        before = ids[:s[0]]
        assert tok.decode(before[before >= 0]).endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    # piecewise tokenisation equals tokenising the whole string
    pairs = normalize_turns(copy.deepcopy(rec["conversations"]), has_image)
    text = llama3_text(pairs)
    whole = [i for c in text.split("<image>") for i in tok(c, add_special_tokens=False).input_ids + [IMAGE_TOKEN_INDEX]][:-1]
    assert ids.tolist() == whole


@pytest.mark.parametrize("k", range(len(CLEAN)))
def test_matches_released_preprocess_llama3(tok, k):
    rec = CLEAN[k]
    has_image = "image" in rec
    source = copy.deepcopy(rec["conversations"])
    if has_image:
        source = released_preprocess_multimodal(source)
    if len(source) % 2 == (0 if source[0]["from"] == "gpt" else 1):
        source = source[:-1]  # ours drops a trailing question; the released code zeroed the sample
    ref_ids, ref_labels = released_preprocess_llama3(source, tok, has_image)
    ids, labels = encode_conversation(rec["conversations"], tok, has_image=has_image, double_bos=True)
    assert ids.tolist() == ref_ids and labels.tolist() == ref_labels
    assert ref_ids[:2] == [tok.bos_token_id] * 2  # the released doubled BOS
    ids1, labels1 = encode_conversation(rec["conversations"], tok, has_image=has_image)
    assert ids1.tolist() == ref_ids[1:] and labels1.tolist() == ref_labels[1:]


def llama3_text(pairs, system: str = SYSTEM) -> str:
    """The whole `llama3` conversation as one string (what the released get_prompt builds)."""
    s = system_text(system)
    for q, a in pairs:
        s += f"{header(USER)}{q}{EOT}{header(ASSISTANT)}{a}{EOT}"
    return s


def test_encode_prompt(tok):
    ids = encode(tok, "What is this?", 1)
    assert (ids == IMAGE_TOKEN_INDEX).sum() == 1 and ids[0] == tok.bos_token_id and ids[1] != tok.bos_token_id
    assert tok.decode(ids[ids >= 0]).endswith("<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    # a prompt is the prefix of the training ids up to the answer
    train, _ = encode_conversation(_conv("<image>\nWhat is this?", "A cat."), tok, has_image=True)
    assert train[:len(ids)].tolist() == ids.tolist()
    ref = released_tokenizer_image_token(build_prompt("What is this?"), tok)
    assert encode(tok, "What is this?", 1, double_bos=True).tolist() == ref
    assert IMAGE_TOKEN_INDEX not in encode(tok, "Hi", 0)


def test_without_system_turn_training_ids_and_prompt_agree(tok):
    """data.system_prompt=false / Usage.system_prompt=false: BOS, then the first user turn."""
    conv = _conv("<image>\nWhat is this?", "A cat.")
    full, full_labels = encode_conversation(conv, tok, has_image=True)
    ids, labels = encode_conversation(conv, tok, has_image=True, system=None)
    n = len(full) - len(ids)                                 # the system turn's tokens
    assert n > 0 and ids.tolist() == [tok.bos_token_id] + full[n + 1:].tolist()
    assert labels.tolist() == [IGNORE_INDEX] + full_labels[n + 1:].tolist()
    assert tok.decode(ids[1:4]) == "<|start_header_id|>user<|end_header_id|>"
    prompt = encode(tok, "What is this?", 1, usage=Usage(double_bos=False, system_prompt=False))
    assert ids[:len(prompt)].tolist() == prompt.tolist()
    assert "system" not in tok.decode(prompt[prompt >= 0])


@pytest.mark.parametrize("conv, has_image, reason", [
    (_conv("<image>\nA?", "B"), False, "image_token_mismatch"),
    (_conv("A?", "B"), True, "image_token_mismatch"),
    (_conv("<image> <image>", "B"), True, "image_token_mismatch"),
    (_conv("A?"), False, "no_answer"),
    ([{"from": "gpt", "value": "<image>\nx"}] + _conv("A?", "B"), True, "image_token_mismatch"),
    ([{"from": "human", "value": "a"}, {"from": "human", "value": "b"}], False, "bad_roles"),
    ([], False, "bad_fields"),
    ([{"from": "human", "value": 3}, {"from": "gpt", "value": "x"}], False, "bad_fields"),
])
def test_bad_conversations(tok, conv, has_image, reason):
    with pytest.raises(TemplateError) as e:
        encode_conversation(conv, tok, has_image=has_image)
    assert e.value.reason == reason


# ----------------------------------------------------------------------------- plain

def test_plain_template(tok):
    conv = _conv("Describe.\n<image>", "A cat on a rug.")
    ids, labels = encode_conversation(conv, tok, has_image=True, template="plain")
    assert ids[:2].tolist() == [tok.bos_token_id, IMAGE_TOKEN_INDEX]
    assert labels[:2].tolist() == [IGNORE_INDEX] * 2 and (labels[2:] == ids[2:]).all()
    assert tok.decode(ids[2:]) == "A cat on a rug.\n"  # the human text is dropped, as released
    ref_ids, ref_labels = released_preprocess_plain(conv, tok)
    assert ids.tolist() == ref_ids and labels.tolist() == ref_labels
    for bad_conv, has_image in [(conv, False), (conv + conv, True), (_conv("No image.", "x"), True)]:
        with pytest.raises(TemplateError):
            encode_conversation(bad_conv, tok, has_image=has_image, template="plain")
