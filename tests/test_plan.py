"""plan.py: the AOT memory plan of a train step, from shapes. With LoRA the frozen language model
carries no optimizer state, so the state (the step's arguments) shrinks by about twice the LLM's
fp32 bytes. The LoRA plan runs as the CLI does, with `--no-hoist` (a subprocess: XLA reads its flags once)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from infllava_jax import params as params_lib
from infllava_jax.data.tokenizer import load_tokenizer
from infllava_jax.plan import apply_sets, load_config, plan
from infllava_jax.training.loop import model_config

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["--config", str(ROOT / "configs" / "tiny.py"), "--mesh", "fsdp=2", "--micro-batch", "2"]


@pytest.mark.slow   # compiles a LoRA step
def test_lora_plan_has_no_optimizer_state_for_the_language_model():
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-m", "infllava_jax.plan", *ARGS, "--config.lora.rank=4", "--no-hoist"],
                         cwd=ROOT, env=env, capture_output=True, text=True, check=True).stdout
    lora_plan = json.loads(out.strip().splitlines()[-1])
    full = plan(apply_sets(load_config(ARGS[1]), []), {"fsdp": 2}, 2, 0.4)
    assert lora_plan["devices"] == full["devices"] == 2 and lora_plan["stage"] == "stage2"
    lm = params_lib.abstract_params(tiny_model_config())["language_model"]
    lm_bytes = sum(x.size * 4 for x in jax.tree.leaves(lm))
    saved = (full["argument_gib"] - lora_plan["argument_gib"]) * 2 ** 30 * 2       # 2 devices, fsdp-sharded
    assert 1.5 * lm_bytes < saved < 2.5 * lm_bytes, (saved, lm_bytes)


def tiny_model_config():
    return model_config(load_config(ARGS[1]), len(load_tokenizer(None)))
