"""The entry points as a user types them: a bad config file, key, value or eval spec is one line on
stderr naming it (with a close match), exit 2, no traceback and nothing created; every data
setting reaches the pipeline from the command line; the bad-sample limit; no side effects
(files with the user's umask, generated data inside the workdir, no Orbax warning)."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from infllava_jax import overrides
from infllava_jax.data import config as data_config
from infllava_jax.training import defaults

ROOT = Path(__file__).resolve().parents[1]
ENV = {**{k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}, "JAX_PLATFORMS": "cpu"}


def run(*args, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=timeout)


def assert_one_line(r: subprocess.CompletedProcess, prog: str, *words: str) -> str:
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert lines[0].startswith(f"{prog}: error: "), lines
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


# (command, its arguments with W = a path that must not be created, words the one line holds)
TRAIN = ["train.py", "--config", "configs/tiny.py", "--workdir", "W"]
EVAL = ["eval.py", "--ckpt", "C", "--data", "D", "--out", "W"]
PLAN = ["-m", "infllava_jax.plan", "--mesh", "fsdp=1"]
FAST = {
    "train_unknown_key": (TRAIN + ["--config.optimizer.lrr=1"], "train.py", ["optimizer.lrr", "did you mean lr?"]),
    "train_missing_file": (["train.py", "--config", "configs/tny.py", "--workdir", "W"], "train.py",
                           ["configs/tny.py", "no such config file", "did you mean configs/tiny.py?"]),
    "eval_bad_spec_key": (EVAL + ["--config", "configs/eval.py:tasks=pope,reso=1008"], "eval.py",
                          ["'reso'", "did you mean res?"]),
    "plan_unknown_key": (PLAN + ["--config", "configs/tiny.py", "--config.lora.rnk=4"],
                         "python -m infllava_jax.plan", ["lora.rnk", "did you mean rank?"]),
}
SLOW = {
    "train_wrong_type": (TRAIN + ["--config.total_steps=many"], "train.py", ["total_steps=many", "an integer"]),
    "train_out_of_range": (TRAIN + ["--config.data.max_bad_fraction=2"], "train.py",
                           ["data.max_bad_fraction", "[0, 1]"]),
    "train_bad_choice": (TRAIN + ["--config.stage=stage3"], "train.py", ["config.stage", "did you mean stage2?"]),
    "train_bad_file_argument": (["train.py", "--config", "configs/tiny.py:stag=1", "--workdir", "W"], "train.py",
                                ["configs/tiny.py", "'stag'", "did you mean stage?"]),
    "train_data_typo": (TRAIN + ["--config.data.num_worker=2"], "train.py",
                        ["num_worker", "did you mean num_workers?"]),
    "train_unknown_flag": (TRAIN + ["--workdri=x"], "train.py", ["workdri"]),
    "train_bad_eval_config": (TRAIN + ["--config.eval_config=tasks=pope,reso=336"], "train.py",
                              ["eval_config", "'reso'"]),
    "eval_bad_resolution": (EVAL + ["--config", "configs/eval.py:res=1000"], "eval.py", ["res", "multiples of 336"]),
    "eval_unknown_task": (EVAL + ["--config", "configs/eval.py:tasks=popee"], "eval.py",
                          ["popee", "did you mean pope?"]),
    "eval_unknown_key": (EVAL + ["--config", "configs/eval.py", "--config.batch_sz=4"], "eval.py",
                         ["batch_sz", "did you mean batch_size?"]),
    "eval_missing_file": (EVAL + ["--config", "configs/evl.py"], "eval.py", ["configs/evl.py", "did you mean"]),
    "plan_old_set_flag": (PLAN + ["--config", "configs/tiny.py", "--set", "lora.rank=4"],
                          "python -m infllava_jax.plan", ["--set"]),
    "plan_mesh_size_not_a_number": (PLAN + ["--config", "configs/tiny.py", "--mesh", "fsdp=x"],
                                    "python -m infllava_jax.plan", ["--mesh", "'fsdp=x'", "whole-number size"]),
    "plan_mesh_size_left_open": (PLAN + ["--config", "configs/tiny.py", "--mesh", "data=2,fsdp=-1"],
                                 "python -m infllava_jax.plan", ["--mesh data=2,fsdp=-1", "every axis's size"]),
}


def _check(tmp_path, case):
    args, prog, words = case
    w = tmp_path / "run"
    r = run(*[str(w) if a == "W" else a for a in args])
    assert_one_line(r, prog, *words)
    assert not w.exists() and os.listdir(tmp_path) == []        # nothing created


@pytest.mark.parametrize("name", FAST)
def test_a_bad_config_is_one_line_and_creates_nothing(tmp_path, name):
    _check(tmp_path, FAST[name])


@pytest.mark.slow
@pytest.mark.parametrize("name", SLOW)
def test_more_bad_configs_are_one_line_and_create_nothing(tmp_path, name):
    _check(tmp_path, SLOW[name])


def test_verify_without_torch_names_the_requirements_file(tmp_path):
    code = ("import runpy, sys; sys.modules['torch'] = None; sys.argv = ['convert', *sys.argv[1:]]; "
            "runpy.run_module('convert', run_name='__main__')")
    r = run("-c", code, tmp_path / "src", tmp_path / "dst", "--verify")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "requirements-dev.txt" in lines[0], r.stderr
    assert not (tmp_path / "dst").exists()


# ----------------------------------------------------------------------------- one config surface

def _non_default(name, value):
    """A value of the field's type other than its default, as typed on a command line."""
    special = {"path": "x.json", "image_folder": "imgs", "template": "plain", "image_mode": "square",
               "buckets": "64+256", "max_len": "256", "max_bad_fraction": "0.5"}
    if name in special:
        return special[name]
    if isinstance(value, bool):
        return str(not value).lower()
    if isinstance(value, int):
        return str(value + 3)
    raise AssertionError(f"no test value for data.{name}={value!r}")


def test_every_data_field_is_settable_and_reaches_the_pipeline():
    fields = data_config.training_defaults()
    derived = set(data_config.RUN_DERIVED)
    field_of = {data_config.TRAINING_NAMES.get(f, f): f for f in data_config.TRAINING_NAMES} | {n: n for n in fields
                                                                                            if n != "path"}
    assert {f.name for f in dataclasses.fields(data_config.DataConfig)} == set(field_of.values()) | derived
    sets = {f"data.{k}": _non_default(k, v) for k, v in fields.items()}
    cfg = overrides.apply(defaults.base_config(), sets)
    defaults.check(cfg)
    dc = data_config.DataConfig(tokens_per_image=36, **data_config.from_training(dict(cfg.data)))   # a tiny model
    for name in fields:
        field = field_of[name]
        typed = sets[f"data.{name}"]
        want = (64, 256) if name == "buckets" else overrides.parse_value(name, fields[name], typed)
        assert getattr(dc, field) == want != data_config.DataConfig.__dataclass_fields__[field].default, name


def test_dry_run_shows_the_data_settings_from_the_command_line(tmp_path):
    r = run(*TRAIN[:-1], tmp_path / "w", "--dry_run", "--config.data.num_workers=2", "--config.data.prefetch_buffer=7",
            "--config.data.max_bad_fraction=0.05", "--config.data.min_bad_samples=5")
    assert r.returncode == 0, r.stderr[-2000:]
    data = json.loads(r.stdout.strip().splitlines()[-1])["data"]
    assert (data["num_workers"], data["prefetch_buffer"], data["max_bad_fraction"], data["min_bad_samples"]) == \
        (2, 7, 0.05, 5)
    assert not (tmp_path / "w").exists()


def test_one_override_syntax():
    cfg = overrides.apply(defaults.base_config(), {"mesh.fsdp": "4", "also_train": "vision_tower",
                                                   "lora.targets": "q_proj+v_proj", "runtime.scan_layers": "no",
                                                   "optimizer.lr": "3e-4", "data.buckets": "(128, 2048)"})
    assert (cfg.mesh.fsdp, cfg.also_train, cfg.lora.targets, cfg.runtime.scan_layers, cfg.optimizer.lr,
            cfg.data.buckets) == (4, ("vision_tower",), ("q_proj", "v_proj"), False, 3e-4, (128, 2048))
    with pytest.raises(overrides.ConfigError, match="is a group of fields"):
        overrides.apply(defaults.base_config(), {"optimizer": "1"})
    from infllava_jax.evaluation.config import get_config
    assert get_config("tasks=pope+mmmu,res=336+1008,progress=false").res == (336, 1008)


def test_batch_axes_come_from_the_logical_rules():
    from infllava_jax import sharding
    assert sharding.BATCH_AXES == dict(sharding.LOGICAL_RULES)["act_batch"] == ("data", "fsdp")
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    assert sharding.data_parallel_size(mesh) == 4
    assert sharding.batch_sharding(mesh, 3).spec[0] == sharding.BATCH_AXES


# ----------------------------------------------------------------------------- no side effects

def test_output_folders_follow_the_umask(tmp_path):
    from infllava_jax.checkpoint import atomic_directory
    old = os.umask(0o027)
    try:
        atomic_directory(tmp_path / "out", lambda d: (d / "f.json").write_text("{}"))
    finally:
        os.umask(old)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o750


def test_no_orbax_warning_on_import_or_first_checkpoint(tmp_path):
    code = ("import infllava_jax; from infllava_jax.training.checkpoints import "
            f"TrainCheckpoints; TrainCheckpoints({str(tmp_path)!r}).close(); print('ok')")
    r = run("-c", code)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]
    assert "Type handler registry" not in r.stderr and "overriding" not in r.stderr, r.stderr


# ----------------------------------------------------------------------------- train.py runs (slow)

def _records(n: int, bad: set[int]) -> list[dict]:
    q = [{"from": "human", "value": "Say something."}, {"from": "gpt", "value": "something"}]
    return [{"id": str(i), "conversations": q} if i not in bad else {"id": str(i), "conversations": "broken"}
            for i in range(n)]


def _train(tmp_path, records, *extra):
    (tmp_path / "d.json").write_text(json.dumps(records))
    return run(*TRAIN[:-1], tmp_path / "w", f"--config.data.path={tmp_path / 'd.json'}",
               "--config.data.synthetic=false", "--config.data.max_len=128", "--config.checkpoint_every=100",
               "--config.log_every=1", *extra, timeout=900)


@pytest.mark.slow
def test_bad_sample_limit_fires_on_a_small_repeating_run(tmp_path):
    """1 bad record in 20 (5%), repeated: the third bad sample (60 read) ends the run, exit 2."""
    r = _train(tmp_path, _records(20, {7}), "--config.total_steps=10")
    last = r.stderr.strip().splitlines()[-1]          # after the run's log lines
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert last.startswith("train.py: error: ") and "d.json: 3 of " in last and "max_bad_fraction=0.01" in last
    seen = int(last.split("3 of ")[1].split()[0])
    assert 40 < seen <= 60 and "min_bad_samples=3" in last     # in the third epoch of 20


@pytest.mark.slow
def test_one_bad_sample_in_a_ten_sample_smoke_run_is_counted(tmp_path):
    r = _train(tmp_path, _records(10, {3}), "--config.total_steps=1", "--config.global_batch=10",
               "--config.micro_batch=5")
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(x) for x in (tmp_path / "w" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["bad_samples"] == 1


@pytest.mark.slow
def test_tiny_config_writes_only_inside_its_workdir_with_the_umask(tmp_path):
    code = ("import os, runpy, sys; os.umask(0o027); sys.argv = ['train.py', *sys.argv[1:]]; "
            "runpy.run_path('train.py', run_name='__main__')")
    r = run("-c", code, "--config", "configs/tiny.py", "--workdir", tmp_path / "w", "--config.total_steps=1",
            "--config.checkpoint_every=1", timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert os.listdir(tmp_path) == ["w"]                           # nothing beside the workdir
    assert (tmp_path / "w" / "synthetic_data" / "train_vqa.json").is_file()
    for p in [tmp_path / "w", *(tmp_path / "w").rglob("*")]:
        if p.is_dir():
            assert p.stat().st_mode & 0o777 == 0o750, p
