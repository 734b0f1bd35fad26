"""How a checkpoint is used (conversation.py, inputs.py, InfLlava.prepare / chat, docs/using.md):
conversion carries the tokenizer files and records the template, stop ids and preprocessing;
every entry point takes them from the checkpoint; the docs' example runs as written."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from convert.__main__ import main as convert_main
from convert.export import main as export_main
from infllava_jax import conversation, presets
from infllava_jax.api import InfLlava
from infllava_jax.conversation import Usage
from infllava_jax.data.tokenizer import load_tokenizer
from infllava_jax.errors import InputError
from infllava_jax.evaluation import demo_fixtures, prompting
from infllava_jax.splice import IMAGE_TOKEN_INDEX
from tests import fixtures

REPO = Path(__file__).resolve().parent.parent
ASTRONAUT = REPO / "infllava_jax" / "assets" / "astronaut.jpg"


@pytest.fixture(scope="module")
def toks(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    return {"llama3": (d / "llama3", fixtures.llama3_tokenizer_dir(d / "llama3")),
            "vicuna": (d / "vicuna", fixtures.vicuna_tokenizer_dir(d / "vicuna"))}


def _usage(d) -> dict:
    return json.loads((Path(d) / "usage.json").read_text())


# ----------------------------------------------------------------------------- templates

def test_vicuna_v1_prompt_is_llava15s(toks):
    tok = load_tokenizer(str(toks["vicuna"][0]))
    assert conversation.template_of(tok) == "vicuna_v1" and tok.pad_token == "<pad>"
    u = Usage(template="vicuna_v1", double_bos=False)
    ids = conversation.encode_prompt(tok, "What is in the image?", 1, u)
    assert ids[0] == tok.bos_token_id == 1 and list(ids).count(1) == 1 and list(ids).count(IMAGE_TOKEN_INDEX) == 1
    k = list(ids).index(IMAGE_TOKEN_INDEX)
    before, after = tok.decode(ids[1:k]), tok.decode(ids[k + 1:])
    assert before == conversation.VICUNA_SYSTEM + " USER: "
    assert after.strip() == "What is in the image? ASSISTANT:"
    assert conversation.stop_ids(u, tok) == (2,)
    two = conversation.encode_prompt(tok, "What is in the image?", 1, Usage(template="vicuna_v1", double_bos=True))
    assert list(two[:2]) == [1, 1] and list(two[1:]) == list(ids)
    bare = conversation.encode_prompt(tok, "What is in the image?", 1, Usage(template="vicuna_v1", double_bos=False,
                                                                               system_prompt=False))
    assert tok.decode(bare[1:list(bare).index(IMAGE_TOKEN_INDEX)]) == "USER: "     # no system text


def test_llama3_tokenizer_as_downloaded(toks):
    d, n = toks["llama3"]
    tok = load_tokenizer(str(d))
    assert len(tok) == n + 1 and tok.pad_token == "<pad>" and tok.pad_token_id == n   # <pad> appended, as released
    eot, eos = tok.convert_tokens_to_ids("<|eot_id|>"), tok.convert_tokens_to_ids("<|end_of_text|>")
    assert conversation.template_of(tok) == "llama3" and conversation.stop_ids(Usage(), tok) == (eot, eos)
    assert conversation.generation_eos_ids(d) == (eos, eot)
    ids = conversation.encode_prompt(tok, "Hi", 1, Usage(double_bos=False))
    assert tok.convert_ids_to_tokens(int(ids[0])) == "<|begin_of_text|>" and ids[1] != ids[0]
    with pytest.raises(InputError, match="no '<\\|begin_of_text\\|>' special token: not a Llama-3 tokenizer"):
        load_tokenizer(str(toks["vicuna"][0]), template="llama3")


def test_sentencepiece_only_tokenizer(tmp_path):
    """liuhaotian/llava-v1.5-7b ships tokenizer.model without tokenizer.json."""
    pytest.importorskip("sentencepiece")
    fixtures.sentencepiece_tokenizer_dir(tmp_path)
    tok = load_tokenizer(str(tmp_path))
    assert conversation.template_of(tok) == "vicuna_v1" and tok.pad_token == "<unk>"
    ids = conversation.encode_prompt(tok, "What is in the image?", 1, Usage(template="vicuna_v1", double_bos=False))
    assert ids[0] == 1 and tok.decode(ids[list(ids).index(IMAGE_TOKEN_INDEX) + 1:]).strip().endswith("ASSISTANT:")


def test_usage_json_values_are_checked(tmp_path):
    (tmp_path / "usage.json").write_text(json.dumps({"template": "llama2"}))
    with pytest.raises(InputError, match=r"usage.json: template='llama2': expected one of 'llama3', 'vicuna_v1'"):
        conversation.read_usage(tmp_path)
    (tmp_path / "usage.json").write_text(json.dumps({"pixel": "native"}))
    with pytest.raises(InputError, match="unknown field"):
        conversation.read_usage(tmp_path)
    assert conversation.read_usage(tmp_path / "none") == Usage()    # written before usage.json: released defaults
    u = Usage(stop_ids=(5,)).override(pixels="native", double_bos="false", image_mode="")
    assert (u.pixels, u.double_bos, u.image_mode, u.stop_ids) == ("native", False, "pad", (5,))
    assert Usage(stop_ids=(5,)).override(template="vicuna_v1").stop_ids == ()   # the other template's stops
    (tmp_path / "usage.json").write_text(json.dumps({"system_prompt": "false"}))
    assert conversation.read_usage(tmp_path).system_prompt is False


def test_training_records_the_datas_system_turn(tmp_path):
    from infllava_jax.data.config import DataConfig
    for flag in (True, False):
        u = conversation.training_usage("", DataConfig(data_path="x.json", system_prompt=flag))
        assert u.system_prompt is flag and Usage(**json.loads(u.to_json())) == u


# ----------------------------------------------------------------------------- conversion

@pytest.fixture(scope="module")
def hf_dirs(toks, tmp_path_factory):
    """HF CLIP (holding a tokenizer of its own, as CLIP downloads do) + HF Llama-3 with its tokenizer."""
    from tests.test_convert import clip_model_dir, llama_dir
    d, n = toks["llama3"]
    cfg = presets.tiny(vocab_size=n)
    base = tmp_path_factory.mktemp("hf")
    clip = clip_model_dir(base / "clip", cfg, vision_only=True)
    (clip / "tokenizer.json").write_text((toks["vicuna"][0] / "tokenizer.json").read_text())
    llama = llama_dir(base / "llama", cfg)
    conversation.copy_tokenizer_files(d, llama)
    return cfg, clip, llama


def test_stage1_start_carries_the_llama_tokenizer(hf_dirs, toks, tmp_path, capsys):
    cfg, clip, llama = hf_dirs
    dst = tmp_path / "w0"
    assert convert_main([str(clip), str(dst), "--llm", str(llama), "--no-progress"]) == 0
    assert f"tokenizer from {llama}; template llama3" in capsys.readouterr().out
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        assert (dst / f).read_bytes() == (toks["llama3"][0] / f).read_bytes(), f   # Llama's, not CLIP's
    tok = load_tokenizer(str(dst))
    eot, eos = tok.convert_tokens_to_ids("<|eot_id|>"), tok.convert_tokens_to_ids("<|end_of_text|>")
    assert _usage(dst) == {"template": "llama3", "stop_ids": [eot, eos], "tokenizer": "files",
                           "pixels": "released", "image_mode": "pad", "double_bos": True, "system_prompt": True}
    m = InfLlava.from_pretrained(dst)
    assert len(m.tokenizer) == m.config.llm.vocab_size == cfg.llm.vocab_size + 1   # <pad> row and token agree
    assert m.stop_ids == (eot, eos)
    # --template overrides the family and the tokenizer
    assert convert_main([str(clip), str(tmp_path / "v"), "--llm", str(llama), "--template", "vicuna_v1",
                         "--no-progress"]) == 0
    assert _usage(tmp_path / "v")["template"] == "vicuna_v1" and not _usage(tmp_path / "v")["double_bos"]


@pytest.fixture(scope="module")
def llava_hf(toks, tmp_path_factory):
    """llava-hf/llava-1.5-7b-hf as downloaded: weights + config + the Vicuna tokenizer files."""
    src = tmp_path_factory.mktemp("llava") / "llava-1.5-7b-hf"
    cfg, model = fixtures.llava_hf_dir(src, *toks["vicuna"])
    return cfg, model, src


def test_llava15_records_vicuna_and_export_carries_the_tokenizer(llava_hf, tmp_path, capsys):
    cfg, _, src = llava_hf
    dst = tmp_path / "ours"
    assert convert_main([str(src), str(dst), "--no-progress"]) == 0
    assert "template vicuna_v1, stop ids [2]" in capsys.readouterr().out
    assert _usage(dst) == {"template": "vicuna_v1", "stop_ids": [2], "tokenizer": "files", "pixels": "released",
                           "image_mode": "pad", "double_bos": False, "system_prompt": True}
    assert (dst / "added_tokens.json").is_file() and not (dst / "preprocessor_config.json").exists()
    m = InfLlava.from_pretrained(dst)
    batch = m.prepare(str(ASTRONAUT), "What is in the image?")
    ids = batch["input_ids"][0]
    assert ids[0] == 1 and m.tokenizer.decode(ids[ids >= 0][1:]).startswith(conversation.VICUNA_SYSTEM + " USER:")
    assert batch["pixel_values"].shape == (1, 3, 84, 84)
    assert export_main([str(dst), str(tmp_path / "hf"), "--format", "hf", "--no-progress"]) == 0
    for f in ("tokenizer.json", "tokenizer_config.json", "added_tokens.json", "generation_config.json"):
        assert (tmp_path / "hf" / f).read_bytes() == (src / f).read_bytes(), f


def test_no_tokenizer_is_said_once_and_asked_for_later(hf_dirs, toks, tmp_path, capsys):
    from tests.test_convert import clip_model_dir, llama_dir
    cfg = presets.tiny()
    clip, llama = clip_model_dir(tmp_path / "clip", cfg, vision_only=True), llama_dir(tmp_path / "llama", cfg)
    dst = tmp_path / "w0"
    assert convert_main([str(clip), str(dst), "--llm", str(llama), "--no-progress"]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if "tokenizer files" in line or line.startswith("tokenizer from")]
    assert len(lines) == 1 and lines[0].startswith("no tokenizer files") and "--tokenizer DIR" in lines[0]
    assert _usage(dst)["tokenizer"] == "" and _usage(dst)["stop_ids"] == []
    with pytest.raises(InputError, match="no tokenizer .* pass --tokenizer DIR"):
        InfLlava.from_pretrained(dst).tokenizer        # never the tiny one in silence (vocabulary 513 <= 4096)
    from infllava_jax.chat import main as chat_main
    assert chat_main(["Hi?", "--ckpt", str(dst), "--image", str(ASTRONAUT)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no tokenizer" in err
    # the same weights with --tokenizer: usable
    m = InfLlava.from_pretrained(dst, tokenizer="tiny")
    assert m.prepare(str(ASTRONAUT), "Hi?")["input_ids"].shape[0] == 1
    assert convert_main([str(clip), str(tmp_path / "w1"), "--llm", str(llama), "--tokenizer", str(toks["llama3"][0]),
                         "--no-progress"]) == 0
    assert (tmp_path / "w1" / "tokenizer.json").is_file() and _usage(tmp_path / "w1")["tokenizer"] == "files"


def test_tiny_tokenizer_only_when_asked_or_recorded(tmp_path):
    model = demo_fixtures.tiny_model(grid=2)
    model.save_pretrained(tmp_path / "tiny")                 # recorded "tiny"
    assert _usage(tmp_path / "tiny")["tokenizer"] == "tiny"
    assert len(prompting.get_tokenizer("", str(tmp_path / "tiny"), 512)) <= 512
    again = InfLlava.from_pretrained(tmp_path / "tiny")
    assert len(again.tokenizer) <= 512                          # loaded, then saved: still "tiny", no files
    again.save_pretrained(tmp_path / "tiny2")
    assert _usage(tmp_path / "tiny2")["tokenizer"] == "tiny" and not (tmp_path / "tiny2" / "tokenizer.json").exists()
    InfLlava(model.config, model.params).save_pretrained(tmp_path / "none")   # no tokenizer at all
    assert _usage(tmp_path / "none")["tokenizer"] == ""
    with pytest.raises(InputError, match="no tokenizer"):
        prompting.get_tokenizer("", str(tmp_path / "none"), 512)
    assert len(prompting.get_tokenizer("tiny", str(tmp_path / "none"), 512)) <= 512


# ----------------------------------------------------------------------------- entry points

def test_recorded_settings_are_every_entry_points_default(tmp_path):
    """The study's checkpoints train on native pixels with one BOS: eval.py and the lmms-eval
    adapter must use that unless told otherwise (the released defaults scored 34.5% not 85%)."""
    from infllava_jax.evaluation.config import get_config
    from infllava_jax.evaluation.lmms_adapter import Adapter
    from infllava_jax.evaluation.sweep import Sweep
    model = demo_fixtures.tiny_model(grid=2)
    model.usage = Usage(pixels="native", image_mode="square", double_bos=False, tokenizer="tiny")
    model.save_pretrained(tmp_path / "ck")
    sweep = Sweep(get_config("tasks=pope,res=672"), str(tmp_path / "ck"), log=lambda *a: None)
    assert (sweep.usage.pixels, sweep.usage.image_mode, sweep.usage.double_bos) == ("native", "square", False)
    sweep = Sweep(get_config("tasks=pope,res=672,pixels=released,double_bos=true"), str(tmp_path / "ck"))
    assert (sweep.usage.pixels, sweep.usage.image_mode, sweep.usage.double_bos) == ("released", "square", True)
    ad = Adapter(str(tmp_path / "ck"))
    assert (ad.usage.pixels, ad.usage.image_mode, ad.usage.double_bos) == ("native", "square", False)
    assert ad._encode("Q")[0] != ad._encode("Q")[1]          # one BOS, as recorded
    ad = Adapter(str(tmp_path / "ck"), pixels="released", double_bos="true")
    assert (ad.usage.pixels, ad.usage.double_bos) == ("released", True)
    m = InfLlava.from_pretrained(tmp_path / "ck")
    assert m.prepare(np.zeros((30, 50, 3), np.uint8), "Q")["pixel_values"].shape == (1, 3, 168, 168)   # native 2x84


def test_prepare_rows_images_and_tags(tmp_path):
    model = demo_fixtures.tiny_model(grid=2)
    img = np.random.default_rng(0).integers(0, 255, (40, 60, 3)).astype(np.uint8)
    b = model.prepare([img, [img, img]], ["One?", "<image> and <image>: which is larger?"])
    assert b["pixel_values"].shape == (2, 2, 3, 84, 84) and not b["pixel_values"][0, 1].any()
    assert [(r == IMAGE_TOKEN_INDEX).sum() for r in b["input_ids"]] == [1, 2]
    assert b["attention_mask"][0, 0] == 0 and b["attention_mask"][:, -1].all()          # left padding
    r = model.prepare(img, ["a", "a much longer question here"], padding_side="right")
    assert r["attention_mask"][0, -1] == 0 and r["attention_mask"][:, 0].all()
    with pytest.raises(InputError, match="2 <image> tags for 1 image"):
        model.prepare(img, "<image> <image>")
    with pytest.raises(InputError, match="3 image rows for 2 prompts"):
        model.prepare([img, img, img], ["a", "b"])


@pytest.mark.slow   # ~60 s on 2 busy cores: the forward and two generation programs compile
def test_docs_example_runs_as_written(tmp_path, monkeypatch, capsys):
    """docs/using.md's python block, exec'd as written (only the checkpoint path substituted)."""
    text = (REPO / "docs" / "using.md").read_text()
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    assert '"CKPT"' in code
    demo_fixtures.make_tiny_checkpoint(tmp_path / "ckpt", grid=2)
    monkeypatch.chdir(REPO)
    scope: dict = {}
    exec(compile(code.replace('"CKPT"', repr(str(tmp_path / "ckpt"))), "docs/using.md", "exec"), scope)
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and isinstance(scope["answers"][0], str)
    model, batch, logits = scope["model"], scope["batch"], scope["logits"]
    assert logits.shape == (2, batch["input_ids"].shape[1] - 1 + model.config.tokens_per_image, 512)
    assert all(len(t) <= 32 for t in scope["tokens"])
    # "the logits of the real tokens are the same either way" (right padding)
    right = model(**model.prepare([scope["image"]] * 2, ["What is in the image?", "Describe the image in detail."],
                                  padding_side="right"))
    n = batch["attention_mask"][0].sum() - 1 + model.config.tokens_per_image
    np.testing.assert_allclose(right[0, :n], logits[0, -n:], rtol=2e-4, atol=2e-4)
