"""A user's whole path, as the commands a user types (subprocesses), on offline fixtures laid
out like real downloads (tests/fixtures.py: tiny random weights, Llama-3 / Vicuna tokenizers).

- LLaVA-1.5: llava-hf download -> `python -m convert --verify` -> chat -> `eval.py` ->
  `python -m convert.export --format hf` -> transformers reloads it: same logits as ours.
- Released INF-LLaVA -> convert --verify -> eval.py at 336 and 1008 -> LoRA fine-tune -> export
  released -> the PyTorch reference agrees; HF CLIP + HF Llama-3 -> convert -> stage 1 -> stage 2
  -> eval.py -> chat.
- Training: `train.py` -> WORKDIR/final/ carries its usage (tiny tokenizer, native pixels, one
  BOS) -> chat and `eval.py` use it with no flags.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests import fixtures

REPO = Path(__file__).resolve().parent.parent
ASTRONAUT = REPO / "infllava_jax" / "assets" / "astronaut.jpg"
pytestmark = pytest.mark.slow


def run(*args, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    r = subprocess.run([sys.executable, *map(str, args)], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=timeout)
    assert r.returncode == 0 and "Traceback" not in r.stderr, f"{args}: exit {r.returncode}\n{r.stderr[-3000:]}"
    return r


def test_llava15_download_convert_verify_chat_eval_export(tmp_path):
    import torch
    import transformers
    from infllava_jax.api import InfLlava
    from infllava_jax.evaluation import demo_fixtures

    tok_dir = tmp_path / "vicuna-tokenizer"
    n_tok = fixtures.vicuna_tokenizer_dir(tok_dir)
    src = tmp_path / "llava-1.5-7b-hf"
    _, torch_model = fixtures.llava_hf_dir(src, tok_dir, n_tok)
    ckpt, out, hf = tmp_path / "llava15", tmp_path / "eval", tmp_path / "llava15-hf"

    r = run("-m", "convert", src, ckpt, "--verify", "--no-progress")
    assert "template vicuna_v1, stop ids [2]" in r.stdout and r.stdout.rstrip().endswith("OK")
    r = run("-m", "infllava_jax.chat", "--ckpt", ckpt, "--image", ASTRONAUT, "What is in the image?",
            "--max-new-tokens", "6")
    assert r.stdout.endswith("\n") and not r.stderr.count("error")
    data = demo_fixtures.make_data(tmp_path / "data", tasks=("pope",))
    run("eval.py", "--config", "configs/eval.py:tasks=pope,res=336,limit=4,batch_size=2,max_new_tokens=4",
        "--ckpt", ckpt, "--data", data, "--out", out)
    res = json.loads((out / "results.json").read_text())
    assert res["usage"]["template"] == "vicuna_v1" and not res["usage"]["double_bos"]
    assert res["results"]["pope"]["336"]["examples"] == 4
    preds = [json.loads(x) for x in (out / "predictions" / "pope_res336.jsonl").read_text().splitlines()]
    assert len(preds) == 4 and all(isinstance(p["text"], str) for p in preds)
    run("-m", "convert.export", ckpt, hf, "--format", "hf", "--no-progress")

    # transformers reloads the export (weights and tokenizer); its logits are the source's and ours
    back = transformers.LlavaForConditionalGeneration.from_pretrained(hf).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(hf)
    ours = InfLlava.from_pretrained(ckpt)
    assert hf_tok("What is in the image?", add_special_tokens=False).input_ids == \
        ours.tokenizer("What is in the image?", add_special_tokens=False).input_ids
    batch = ours.prepare(str(ASTRONAUT), "What is in the image?")
    ids = batch["input_ids"][0]
    k = int(np.flatnonzero(ids == -200)[0])
    hf_ids = np.concatenate([ids[:k], [back.config.image_token_index] * ours.config.tokens_per_image, ids[k + 1:]])
    with torch.no_grad():
        px = torch.from_numpy(batch["pixel_values"])
        theirs = back(input_ids=torch.from_numpy(hf_ids[None]).long(), pixel_values=px).logits[0].numpy()
        source = torch_model(input_ids=torch.from_numpy(hf_ids[None]).long(), pixel_values=px).logits[0].numpy()
    np.testing.assert_array_equal(theirs, source)
    mine = ours(hf_ids[None], batch["pixel_values"])[0]
    assert np.abs(mine - theirs).max() <= 1e-4 * np.abs(theirs).max()


def test_training_final_is_used_as_trained(tmp_path):
    from tests.test_multihost import make_clean_dataset
    from infllava_jax.evaluation import demo_fixtures

    d = make_clean_dataset(tmp_path / "data")
    work = tmp_path / "run"
    run("train.py", "--config", "configs/tiny.py", "--workdir", work, "--config.data.synthetic=False",
        f"--config.data.path={d / 'train.json'}", f"--config.data.image_folder={d}", "--config.total_steps=2",
        "--config.log_every=1", "--config.checkpoint_every=2", "--config.data.max_len=160")
    final = work / "final"
    assert json.loads((final / "usage.json").read_text()) == {
        "template": "llama3", "stop_ids": [], "tokenizer": "tiny", "pixels": "native", "image_mode": "pad",
        "double_bos": False, "system_prompt": True}
    run("-m", "infllava_jax.chat", "--ckpt", final, "--image", ASTRONAUT, "What is in the image?",
        "--max-new-tokens", "4")
    data = demo_fixtures.make_data(tmp_path / "bench", tasks=("pope",))
    run("eval.py", "--config", "configs/eval.py:tasks=pope,res=1008,limit=2,batch_size=2,max_new_tokens=2",
        "--ckpt", final, "--data", data, "--out", tmp_path / "eval")
    usage = json.loads((tmp_path / "eval" / "results.json").read_text())["usage"]
    assert (usage["pixels"], usage["double_bos"], usage["tokenizer"]) == ("native", False, "tiny")
    assert json.loads((tmp_path / "eval" / "results.json").read_text())["results"]["pope"]["1008"]["pixels"] == 252


def test_released_convert_sweep_lora_finetune_export_reference(tmp_path):
    """Released INF-LLaVA (+ its Llama-3 tokenizer) -> convert --verify -> eval.py at 336 and 1008
    -> LoRA fine-tune with train.py on a LLaVA JSON -> merged final/ -> export --format released
    -> the PyTorch reference loads the export and gives our logits (convert --verify)."""
    from convert import formats
    from convert.export import released_config_json
    from infllava_jax import conversation, presets
    from infllava_jax.evaluation import demo_fixtures
    from infllava_jax.params import abstract_params
    from tests.test_convert import random_state, write_st
    from tests.test_multihost import make_clean_dataset

    tok_dir = tmp_path / "Meta-Llama-3-8B-Instruct"
    n_tok = fixtures.llama3_tokenizer_dir(tok_dir)
    cfg = presets.tiny(vocab_size=n_tok + 1).replace(pad_token_id=n_tok)     # + <pad>, as released
    sd = random_state(formats.released_rows(cfg), abstract_params(cfg), seed=0)
    src = write_st(tmp_path / "INF-LLaVA", sd, shard_bytes=700_000)
    (src / "config.json").write_text(json.dumps(released_config_json(cfg, "float32")))
    conversation.copy_tokenizer_files(tok_dir, src)
    ckpt, final = tmp_path / "ours", tmp_path / "ft" / "final"

    r = run("-m", "convert", src, ckpt, "--verify", "--no-progress")
    assert "template llama3" in r.stdout and r.stdout.rstrip().endswith("OK")
    data = demo_fixtures.make_data(tmp_path / "bench", tasks=("pope",))
    run("eval.py", "--config", "configs/eval.py:tasks=pope,res=336+1008,limit=2,batch_size=2,max_new_tokens=2",
        "--ckpt", ckpt, "--data", data, "--out", tmp_path / "eval")
    res = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert sorted(res["results"]["pope"]) == ["1008", "336"]
    assert (res["usage"]["pixels"], res["usage"]["double_bos"]) == ("released", True)   # the released loader's

    d = make_clean_dataset(tmp_path / "data")
    run("train.py", "--config", "configs/tiny.py", "--workdir", tmp_path / "ft", "--config.data.synthetic=False",
        f"--config.data.path={d / 'train.json'}", f"--config.data.image_folder={d}", "--config.total_steps=2",
        f"--config.init_checkpoint={ckpt}", f"--config.tokenizer={ckpt}", "--config.lora.rank=4",
        "--config.log_every=1", "--config.checkpoint_every=2", "--config.data.max_len=160")
    assert json.loads((final / "usage.json").read_text()) == {
        "template": "llama3", "stop_ids": [], "tokenizer": "files", "pixels": "native", "image_mode": "pad",
        "double_bos": False, "system_prompt": True}
    assert (final / "tokenizer.json").read_bytes() == (tok_dir / "tokenizer.json").read_bytes()
    run("-m", "convert.export", final, tmp_path / "exported", "--format", "released", "--no-progress")
    assert (tmp_path / "exported" / "tokenizer_config.json").is_file()
    r = run("-m", "convert", tmp_path / "exported", tmp_path / "reimported", "--verify", "--no-progress")
    assert r.stdout.rstrip().endswith("OK")


def test_clip_and_llama_to_stage1_stage2_eval_chat(tmp_path):
    """HF CLIP + HF Llama-3 (with its tokenizer) -> convert (the stage-1 start) -> train.py stage 1
    -> stage 2 from stage 1's final/ (its tokenizer travels with it) -> eval.py -> chat."""
    from infllava_jax import conversation, presets
    from infllava_jax.evaluation import demo_fixtures
    from tests.test_convert import clip_model_dir, llama_dir
    from tests.test_multihost import make_clean_dataset

    tok_dir = tmp_path / "tok"
    cfg = presets.tiny(vocab_size=fixtures.llama3_tokenizer_dir(tok_dir))
    clip = clip_model_dir(tmp_path / "clip-vit-large-patch14-336", cfg, vision_only=True)
    llama = llama_dir(tmp_path / "Meta-Llama-3-8B-Instruct", cfg)
    conversation.copy_tokenizer_files(tok_dir, llama)
    w0, s1, s2 = tmp_path / "W0", tmp_path / "stage1", tmp_path / "stage2"
    run("-m", "convert", clip, w0, "--llm", llama, "--no-progress")
    d = make_clean_dataset(tmp_path / "data")
    common = ["--config.data.synthetic=False", f"--config.data.path={d / 'train.json'}",
              f"--config.data.image_folder={d}", "--config.total_steps=2", "--config.log_every=1",
              "--config.checkpoint_every=2", "--config.data.max_len=160"]
    run("train.py", "--config", "configs/tiny.py:stage=1", "--workdir", s1, f"--config.init_checkpoint={w0}",
        f"--config.tokenizer={w0}", *common)
    assert json.loads((s1 / "final" / "usage.json").read_text())["image_mode"] == "square"   # stage 1's
    run("train.py", "--config", "configs/tiny.py", "--workdir", s2, f"--config.init_checkpoint={s1 / 'final'}",
        f"--config.tokenizer={s1 / 'final'}", *common)
    final = s2 / "final"
    usage = json.loads((final / "usage.json").read_text())
    assert (usage["template"], usage["tokenizer"], usage["pixels"], usage["image_mode"]) == \
        ("llama3", "files", "native", "pad")
    assert (final / "tokenizer.json").read_bytes() == (tok_dir / "tokenizer.json").read_bytes()
    data = demo_fixtures.make_data(tmp_path / "bench", tasks=("pope",))
    run("eval.py", "--config", "configs/eval.py:tasks=pope,res=1008,limit=2,batch_size=2,max_new_tokens=2",
        "--ckpt", final, "--data", data, "--out", tmp_path / "eval")
    assert json.loads((tmp_path / "eval" / "results.json").read_text())["results"]["pope"]["1008"]["examples"] == 2
    run("-m", "infllava_jax.chat", "--ckpt", final, "--image", ASTRONAUT, "What is in the image?",
        "--max-new-tokens", "4")
