"""train.py end to end: metrics, final export, and exact resume after SIGKILL."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from infllava_jax import InfLlava
from tests.test_multihost import make_clean_dataset

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """The multi-host tests' 24 records, plus a text-only one and one with a missing image."""
    d = make_clean_dataset(tmp_path_factory.mktemp("data"))
    recs = json.loads((d / "train.json").read_text())
    recs.append({"id": "text", "conversations": [{"from": "human", "value": "Say hi."},
                                                  {"from": "gpt", "value": "hi"}]})
    recs.append({"id": "broken", "image": "missing.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "nothing"}]})
    (d / "train.json").write_text(json.dumps(recs))
    return d


def _cmd(workdir, dataset, steps=12):
    return [sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / "configs" / "tiny.py"),
            "--workdir", str(workdir), "--config.data.synthetic=False",
            f"--config.data.path={dataset / 'train.json'}", f"--config.data.image_folder={dataset}",
            f"--config.total_steps={steps}", "--config.log_every=1", "--config.checkpoint_every=3",
            "--config.data.max_len=160", "--config.optimizer.max_grad_norm=0",
            "--config.data.max_bad_fraction=0.1"]   # 1 bad record in 26, repeated: 3.8%


def _env():
    return {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}


def _losses(workdir):
    rows = [json.loads(x) for x in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows}   # a re-logged step after resume keeps the last value


@pytest.mark.slow   # two train.py processes, one killed
def test_sigkill_and_resume_is_exact(tmp_path, dataset):
    ref = tmp_path / "ref"
    subprocess.run(_cmd(ref, dataset), env=_env(), check=True, capture_output=True)
    want = _losses(ref)
    assert sorted(want) == list(range(1, 13))
    rows = [json.loads(x) for x in (ref / "metrics.jsonl").read_text().splitlines()]
    for key in ("step", "loss", "lr", "grad_norm", "tokens_per_s", "mfu"):
        assert all(key in r for r in rows)
    assert rows[-1]["bad_samples"] >= 1 and (ref / "tensorboard").is_dir()

    # kill -9 after step 7 was logged (checkpoint at 6 exists), restart the same command
    run = tmp_path / "run"
    p = subprocess.Popen(_cmd(run, dataset), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and max(_losses(run) if (run / "metrics.jsonl").exists() else [0]) < 7:
        time.sleep(0.2)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert 7 <= max(_losses(run)) < 12, "the run was not killed mid-way"
    subprocess.run(_cmd(run, dataset), env=_env(), check=True, capture_output=True)
    got = _losses(run)
    assert sorted(got) == list(range(1, 13))
    np.testing.assert_allclose([got[s] for s in range(1, 13)], [want[s] for s in range(1, 13)], rtol=1e-6)

    # the exported model loads and matches the uninterrupted run's export
    a, b = InfLlava.from_pretrained(ref / "final"), InfLlava.from_pretrained(run / "final")
    for x, y in zip(jax_leaves(a.params), jax_leaves(b.params)):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)


def jax_leaves(tree):
    import jax
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


@pytest.mark.slow   # a training run with evals
def test_periodic_eval_uses_in_memory_params(tmp_path, dataset):
    from infllava_jax.evaluation import demo_fixtures
    data = demo_fixtures.make_data(tmp_path / "eval_data", tasks=("pope",))
    run = tmp_path / "run"
    cmd = _cmd(run, dataset, steps=2) + ["--config.eval_every=2", f"--config.eval_data={data}",
                                         "--config.eval_config=tasks=pope,res=1008,limit=4,batch_size=2,"
                                         "max_new_tokens=4"]
    subprocess.run(cmd, env=_env(), check=True, capture_output=True)
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval/pope@1008" in r]
    assert len(evals) == 1 and evals[0]["step"] == 2 and 0.0 <= evals[0]["eval/pope@1008"] <= 1.0
    assert (run / "eval" / "step_2" / "results.json").is_file()
