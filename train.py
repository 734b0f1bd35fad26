"""Train INF-LLaVA (stage 1 or 2, docs/model.md section 7) on a mesh of devices.

    python train.py --config configs/tiny.py --workdir W [--config.total_steps=100 ...]
    python train.py --config configs/stage2_8b.py --workdir W --config.init_checkpoint=STAGE1/final

Restarting the same command resumes from the latest complete checkpoint in W (parameters,
optimizer state and step; the data order follows from the step): the loss trajectory is the
same as an uninterrupted run. At the end W/final holds the trained model in our checkpoint
format (`InfLlava.from_pretrained(W/final)`): the stage-1 -> stage-2 hand-off and eval's input.
This file parses the flags; the loop is infllava_jax/training/loop.py.

Multi-process (README "Scale-out"): one process per host, started with the same command plus
`--coordinator_address=HOST:PORT --num_processes=N --process_id=I`, or with nothing extra on a
TPU pod slice or under Slurm (auto-detected; infllava_jax/distributed.py). W must be on a
filesystem every process sees. The global batch is the same whatever the process count, and a
checkpoint resumes onto another mesh, device count or process count (elastic resume).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
from pathlib import Path

from absl import app, flags

# --config FILE[:args] and --config.<field>=VALUE are read by infllava_jax/overrides.py (as in eval.py
# and plan); the flag is defined for --help only
flags.DEFINE_string("config", None, "configs/<name>.py[:k=v,...], then --config.<field>=VALUE for any field "
                    "(docs/configuration.md)")
_WORKDIR = flags.DEFINE_string("workdir", None, "checkpoints, metrics.jsonl, tensorboard/, final/")
# multi-process (infllava_jax/distributed.py); unset: JAX_* variables, then Slurm / Open MPI / TPU pod detection
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0's coordinator service")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "number of processes (hosts)")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "this process's index in [0, num_processes)")
_LOCAL_DEVICES = flags.DEFINE_string("local_device_ids", "auto",
                                     "auto | all | 0,1,..: auto = one GPU per process when a cluster runs "
                                     "several processes per node, else all local devices")
_DISTRIBUTED = flags.DEFINE_enum("distributed", "auto", ["auto", "on", "off"],
                                 "auto: jax.distributed when flags, JAX_* variables or a multi-process cluster "
                                 "say so; on: always (JAX auto-detects the unset values); off: never")
_INIT_TIMEOUT = flags.DEFINE_integer("initialization_timeout", 300, "s for all processes to meet at start-up")
_HEARTBEAT_TIMEOUT = flags.DEFINE_integer("heartbeat_timeout", 100,
                                          "s without heartbeats after which a process is declared dead")
_STEP_TIMEOUT = flags.DEFINE_integer("step_timeout", 1800, "multi-process: s a step (or a checkpoint save) may "
                                     "take before the watchdog ends the process; 0 = no watchdog")
_COMPILE_TIMEOUT = flags.DEFINE_integer("compile_timeout", 3600, "multi-process: the same for start-up and for "
                                        "steps that compile")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "print the resolved multi-process settings and batch layout as "
                             "JSON and exit (starts nothing)")
flags.mark_flags_as_required(["workdir"])
log = logging.getLogger("infllava_jax")
_CFG = []   # the checked config, set by parse_flags


def parse_flags(argv: list[str]) -> list[str]:
    """Every flag, config key and value checked before anything runs or is created: a bad one is
    one line `train.py: error: ...` and exit 2 (overrides.py)."""
    from infllava_jax import overrides
    from infllava_jax.training import defaults
    try:
        spec, sets, rest = overrides.split_argv(argv[1:])
        flags.FLAGS(argv[:1] + rest)
        cfg = overrides.apply(overrides.load_config(spec) if spec else _no_config(), sets)
        defaults.check(cfg)
    except (overrides.ConfigError, flags.Error) as e:
        overrides.fail("train.py", e)
    _CFG.append(cfg)
    return argv[:1]


def _no_config():
    from infllava_jax.overrides import ConfigError
    raise ConfigError("--config: missing; e.g. --config configs/tiny.py (docs/configuration.md)")


def _data_settings(cfg) -> dict:
    """The data pipeline's settings from config.data (DataConfig field names; "" and () = the stage's / default)."""
    from infllava_jax.data.config import from_training
    return {k: list(v) if isinstance(v, tuple) else v for k, v in from_training(dict(cfg.data)).items()}


def main(_):
    from infllava_jax import distributed

    cfg = _CFG[0]
    cluster = distributed.resolve(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                                  _LOCAL_DEVICES.value, _DISTRIBUTED.value)
    if _DRY_RUN.value:   # what this process would do; the launch recipes' dry runs print it
        P = cluster.num_processes or 1
        accum, rem = divmod(cfg.global_batch, cfg.micro_batch * P)
        print(json.dumps({"cluster": dataclasses.asdict(cluster), "workdir": str(Path(_WORKDIR.value).absolute()),
                          "global_batch": cfg.global_batch, "micro_batch_per_process": cfg.micro_batch,
                          "accumulation_steps": accum if accum and not rem else
                          f"invalid: global_batch is not micro_batch x {P} processes x an integer",
                          "mesh": dict(cfg.mesh), "data": _data_settings(cfg)}))
        return
    logging.getLogger().setLevel(logging.WARNING)
    log.setLevel(logging.INFO)
    distributed.initialize(cluster, initialization_timeout=_INIT_TIMEOUT.value,
                           heartbeat_timeout=_HEARTBEAT_TIMEOUT.value)
    from infllava_jax.errors import InputError, one_line
    from infllava_jax.training.loop import train
    from convert.lora_export import save_adapters   # lora.export=adapters: PEFT files (the converters' writer)
    if not cluster.distributed:
        try:
            train(cfg, _WORKDIR.value, save_adapters=save_adapters)
        except InputError as e:   # bad data, checkpoint or ids: one line, no traceback
            print(f"train.py: error: {one_line(e, 1000)}", file=sys.stderr)
            sys.exit(2)
        return
    import jax
    deadlines = distributed.Deadlines(_STEP_TIMEOUT.value, _COMPILE_TIMEOUT.value) \
        if _STEP_TIMEOUT.value > 0 else None
    try:
        train(cfg, _WORKDIR.value, deadlines, save_adapters)
    except InputError as e:   # every process reads the same input: each says so and ends at once
        print(f"train.py: error: {one_line(e, 1000)}", file=sys.stderr, flush=True)
        os._exit(2)
    except BaseException as e:   # noqa: BLE001 - never wait in the shutdown barrier after a failure
        distributed.fail_fast(e, f"process {jax.process_index()} of {jax.process_count()}")
    if deadlines:
        deadlines.disarm()


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
