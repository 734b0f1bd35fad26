"""Train INF-LLaVA (stage 1 or 2, SPEC section 7) on a mesh of devices.

    python train.py --config configs/tiny.py --workdir W [--config.total_steps=100 ...]
    python train.py --config configs/stage2_8b.py --workdir W --config.init_checkpoint=STAGE1/final

Restarting the same command resumes from the latest complete checkpoint in W (parameters,
optimizer state, step and the data iterator): the loss trajectory is the same as an
uninterrupted run. At the end W/final holds the trained model in our checkpoint format
(`InfLlava.from_pretrained(W/final)`): the stage-1 -> stage-2 hand-off and eval's input.

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
import time
from pathlib import Path

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/<name>.py[:args]", lock_config=True)
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
flags.mark_flags_as_required(["config", "workdir"])
log = logging.getLogger("infllava_jax")


def model_config(cfg, vocab_size: int):
    """InfLlavaConfig from the init checkpoint or a preset, with the run's runtime settings."""
    from infllava_jax import presets
    from infllava_jax.checkpoint import load_config

    if cfg.init_checkpoint:
        mc = load_config(cfg.init_checkpoint)
    else:
        kw = dict(cfg.model)
        preset = kw.pop("preset")
        if preset == "tiny":
            kw["grid"] = kw["grid"] or None      # grid=0: the LLaVA-1.5 path
            kw["vocab_size"] = vocab_size
        mc = getattr(presets, preset)(**kw)
    mc = mc.with_runtime(**cfg.runtime)
    if vocab_size > mc.llm.vocab_size:
        raise ValueError(f"tokenizer has {vocab_size} tokens but the model's vocabulary is {mc.llm.vocab_size}")
    return mc


def data_config(cfg, mc, workdir: Path, per_process_batch: int):
    from infllava_jax.data.pipeline import DataConfig

    d = cfg.data
    path, folder = d.path, d.image_folder
    if d.synthetic and not path:
        from infllava_jax.data import synthetic
        root = workdir.parent / "data"
        synthetic.generate(root, seed=0)           # 252 px; the pipeline resizes to the model's input
        path = str(root / ("train_caption.json" if cfg.stage == "stage1" else "train_vqa.json"))
        folder = str(root)
    return DataConfig.for_model(mc, path, folder, stage=int(cfg.stage[-1]), max_len=d.max_len,
                                buckets=tuple(d.buckets) or None,
                                batch_size=per_process_batch, seed=cfg.seed, num_threads=d.num_threads)


def periodic_eval(cfg, step, mc, params, tok, mesh, workdir, writer):
    """Score `cfg.eval_config` (configs/eval.py arguments) on `cfg.eval_data` with the in-memory
    parameters (no checkpoint round trip), on the training mesh; logged as eval/<task>@<res>."""
    from configs.eval import get_config
    from infllava_jax import InfLlava
    from infllava_jax.evaluation import scorers, sweep

    ecfg = get_config(cfg.eval_config)
    ecfg.mesh = ",".join(f"{k}={v}" for k, v in mesh.shape.items())
    ecfg.progress = False
    t = time.perf_counter()
    summary = sweep.run(ecfg, ckpt="(in memory)", data=cfg.eval_data, out=str(workdir / "eval" / f"step_{step}"),
                        log=log.info, model=InfLlava(mc, params), tokenizer=tok)
    scores = {f"eval/{task}@{res}": scorers.main_metric(rec["metrics"])
              for task, by_res in summary["results"].items() for res, rec in by_res.items() if rec.get("metrics")}
    log.info("step %d eval (%.1f s): %s", step, time.perf_counter() - t, json.dumps(scores))
    writer.write_eval(step, scores)


def main(_):
    from infllava_jax import distributed

    cfg = _CONFIG.value
    cluster = distributed.resolve(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                                  _LOCAL_DEVICES.value, _DISTRIBUTED.value)
    if _DRY_RUN.value:   # what this process would do; the launch recipes' dry runs print it
        P = cluster.num_processes or 1
        accum, rem = divmod(cfg.global_batch, cfg.micro_batch * P)
        print(json.dumps({"cluster": dataclasses.asdict(cluster), "workdir": str(Path(_WORKDIR.value).absolute()),
                          "global_batch": cfg.global_batch, "micro_batch_per_process": cfg.micro_batch,
                          "accumulation_steps": accum if accum and not rem else
                          f"invalid: global_batch is not micro_batch x {P} processes x an integer",
                          "mesh": dict(cfg.mesh)}))
        return
    logging.getLogger().setLevel(logging.WARNING)
    log.setLevel(logging.INFO)
    distributed.initialize(cluster, initialization_timeout=_INIT_TIMEOUT.value,
                           heartbeat_timeout=_HEARTBEAT_TIMEOUT.value)
    if not cluster.distributed:
        train(cfg, _WORKDIR.value)
        return
    import jax
    dog = distributed.Watchdog() if _STEP_TIMEOUT.value > 0 else None
    try:
        train(cfg, _WORKDIR.value, dog)
    except BaseException as e:   # noqa: BLE001 - never wait in the shutdown barrier after a failure
        distributed.fail_fast(e, f"process {jax.process_index()} of {jax.process_count()}")
    if dog:
        dog.disarm()


def train(cfg, workdir, dog=None) -> dict:
    """Run (or resume) the training of `cfg` in `workdir`; returns a summary (steps, seconds,
    final loss, data statistics). `dog`: the multi-process step watchdog."""
    import jax
    import numpy as np

    from infllava_jax import InfLlava, api, sharding
    from infllava_jax.data.batching import agree_across_processes, pad_batch
    from infllava_jax.data.pipeline import data_stats, make_dataset
    from infllava_jax.data.tokenizer import load_tokenizer
    from infllava_jax.training import flops, partition, step as step_lib
    from infllava_jax.training.checkpoints import TrainCheckpoints, abstract_like
    from infllava_jax.training.metrics import MetricsWriter

    t_start = time.perf_counter()
    workdir = Path(workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    P, me = jax.process_count(), f"process {jax.process_index()} of {jax.process_count()}"

    def watch(timeout_flag, what: str):      # multi-process: bounded waits, never a silent hang
        if dog:
            seconds = timeout_flag.value
            dog.arm(seconds, f"{me}: {what} made no progress in {seconds} s. A collective is probably "
                             "waiting for a process that hangs, was stopped or lost its network: see the "
                             "other processes' logs (raise --step_timeout/--compile_timeout for slow steps)")

    watch(_COMPILE_TIMEOUT, "start-up (model, data, checkpoint restore)")
    logging.getLogger("absl").setLevel(logging.WARNING)   # Orbax's per-save chatter
    logging.getLogger().setLevel(logging.WARNING)
    log.setLevel(logging.INFO)
    cache = cfg.compilation_cache_dir or str(Path.home() / ".cache" / "infllava_jax" / "xla")
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)

    # -- mesh, model, data ---------------------------------------------------------------------
    mesh = sharding.make_mesh(dict(cfg.mesh))
    tok = load_tokenizer(cfg.tokenizer or None)
    mc = model_config(cfg, len(tok))
    accum = cfg.global_batch // (cfg.micro_batch * jax.process_count())
    rows = mesh.shape.get("data", 1) * mesh.shape.get("fsdp", 1)   # the batch axis is split over data x fsdp
    if (cfg.micro_batch * jax.process_count()) % rows:
        raise ValueError(f"config.micro_batch={cfg.micro_batch} x {jax.process_count()} processes does not split "
                         f"over the mesh's data x fsdp = {rows} devices ({dict(mesh.shape)})")
    if accum < 1 or accum * cfg.micro_batch * jax.process_count() != cfg.global_batch:
        raise ValueError(f"global_batch {cfg.global_batch} is not micro_batch {cfg.micro_batch} x "
                         f"{jax.process_count()} processes x an integer number of accumulation steps")
    if P > 1 and cfg.data.synthetic and not cfg.data.path:   # process 0 writes the demo data once
        from jax.experimental import multihost_utils
        if jax.process_index() == 0:
            data_config(cfg, mc, workdir, cfg.micro_batch)
        multihost_utils.sync_global_devices("synthetic data")
    dcfg = data_config(cfg, mc, workdir, cfg.micro_batch)
    data_it = iter(make_dataset(dcfg, tok))
    log.info("mesh %s; model grid %s, %d tokens/image; %s; %d accumulation steps of %d per process",
                 dict(mesh.shape), mc.grid, mc.tokens_per_image, cfg.stage, accum, cfg.micro_batch)
    if P > 1:
        log.info("%s (%d local devices): reads rows [%d, %d) of every global micro-batch of %d",
                 me, jax.local_device_count(), jax.process_index() * cfg.micro_batch,
                 (jax.process_index() + 1) * cfg.micro_batch, P * cfg.micro_batch)

    # -- state ---------------------------------------------------------------------------------
    tx, schedule = step_lib.make_optimizer(cfg.optimizer.lr, cfg.total_steps, cfg.optimizer.warmup_ratio,
                                           cfg.optimizer.weight_decay,
                                           max_grad_norm=cfg.optimizer.max_grad_norm or None)
    if cfg.init_checkpoint:
        params = InfLlava.from_pretrained(cfg.init_checkpoint, mesh=mesh).params  # checks keys and shapes
        log.info("initial weights: %s", cfg.init_checkpoint)
    else:
        params = api.init_params(mc, cfg.seed, mesh)
        log.info("initial weights: random (seed %d)", cfg.seed)
    parts = step_lib.trainable_parts(cfg.stage, cfg.also_train)
    _, state_sh = partition.state_shardings(mc, parts, tx, mesh)
    state = jax.jit(lambda p: step_lib.init_state(p, parts, tx), out_shardings=state_sh)(params)
    del params
    ckpts = TrainCheckpoints(workdir, keep=cfg.keep_checkpoints)
    start = ckpts.latest_step() or 0
    if start:
        state = ckpts.restore(start, abstract_like(state), data_it)
        log.info("resumed from %s at step %d", ckpts.dir / str(start), start)

    train_step = jax.jit(step_lib.make_train_step(mc, tx, schedule, cfg.loss_chunk),
                         in_shardings=(state_sh, None), out_shardings=(state_sh, None), donate_argnums=0)
    n_dev = jax.device_count()
    peak, peak_note = flops.device_peak_flops()
    log.info("MFU denominator: %s x %d devices", peak_note, n_dev)
    writer = MetricsWriter(workdir, cfg.total_steps, enabled=jax.process_index() == 0)

    def next_global_batch():
        micro = [next(data_it) for _ in range(accum)]
        L = max(m["input_ids"].shape[1] for m in micro)
        micro = [agree_across_processes(pad_batch(m, L, tok.pad_token_id), tok.pad_token_id) for m in micro]
        L = max(m["input_ids"].shape[1] for m in micro)
        micro = [pad_batch(m, L, tok.pad_token_id) for m in micro]
        keys = ("input_ids", "labels", "attention_mask", "pixel_values")
        local = {k: np.stack([m[k] for m in micro]) for k in keys}
        return {k: jax.make_array_from_process_local_data(sharding.batch_sharding(mesh, v.ndim, 1), v)
                for k, v in local.items()}

    # -- loop ----------------------------------------------------------------------------------
    compiled, skipped, compile_s, last_loss = set(), 0, 0.0, None
    t_last, tokens_since, flops_since = time.perf_counter(), 0, 0.0
    with jax.set_mesh(mesh):
        for step in range(start, cfg.total_steps):
            watch(_STEP_TIMEOUT, f"step {step + 1}")
            batch = next_global_batch()
            A, b, L = batch["input_ids"].shape
            if (A, b, L) not in compiled:
                watch(_COMPILE_TIMEOUT, f"step {step + 1} (compiling for micro-batches {(A, b, L)})")
            seq = L + mc.tokens_per_image - 1                  # spliced length
            t0 = time.perf_counter()
            state, m = train_step(state, batch)
            if (A, b, L) not in compiled:                      # first step of a new bucket: compile
                jax.block_until_ready(m)
                compiled.add((A, b, L))
                compile_s += time.perf_counter() - t0
                log.info("compiled the train step for micro-batches %s in %.1f s (cache %s)",
                             (A, b, L), time.perf_counter() - t0, cache)
                t_last, tokens_since, flops_since = time.perf_counter(), 0, 0.0
            else:
                tokens_since += A * b * seq
                flops_since += flops.train_step_flops(mc, A * b, seq, parts)
            if bool(m["skipped"]):
                skipped += 1
                log.warning("step %d: skipped, not trained on (supervised tokens %d, loss %s)",
                                step + 1, int(m["tokens"]), float(m["loss"]))
            if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.total_steps:
                m = jax.device_get(m)
                last_loss = float(m["loss"])
                dt = max(time.perf_counter() - t_last, 1e-9)
                stats = data_stats(data_it) or {}
                writer.write(step + 1, {
                    "loss": float(m["loss"]), "lr": float(m["lr"]), "grad_norm": float(m["grad_norm"]),
                    "supervised_tokens": int(m["tokens"]), "tokens_per_s": tokens_since / dt,
                    "mfu": flops_since / dt / (peak * n_dev), "skipped_steps": skipped,
                    "bad_samples": stats.get("bad_total", 0), "seq_len": seq})
                t_last, tokens_since, flops_since = time.perf_counter(), 0, 0.0
            if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.total_steps:
                ckpts.save(step + 1, state, data_it)
            if cfg.eval_every and (step + 1) % cfg.eval_every == 0:
                periodic_eval(cfg, step + 1, mc, {**state["frozen"], **state["params"]}, tok, mesh, workdir, writer)
                t_last, tokens_since, flops_since = time.perf_counter(), 0, 0.0
    watch(_COMPILE_TIMEOUT, "the last checkpoint and the export")
    ckpts.wait()
    stats = data_stats(data_it)
    log.info("data: %s", json.dumps(stats))
    if cfg.export_final:
        params = {**state["frozen"], **state["params"]}
        InfLlava(mc, params).save_pretrained(workdir / "final")   # all processes take part
        log.info("wrote %s (InfLlava.from_pretrained)", workdir / "final")
    ckpts.close()
    writer.close()
    return {"steps": cfg.total_steps, "resumed_from": start, "seconds": round(time.perf_counter() - t_start, 1),
            "compile_seconds": round(compile_s, 1), "final_loss": last_loss, "data": stats}


if __name__ == "__main__":
    app.run(main)
