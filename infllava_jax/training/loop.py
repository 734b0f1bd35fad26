"""The training loop (levanter's Trainer): build the run from a config, `init_or_restore` the
state, then one short loop over steps; everything periodic is a hook `(every, fn)`: metrics,
checkpoints, evaluation, the watchdog's next deadline. The host never waits for a step: the loop
runs under `jax.transfer_guard("disallow")`, skipped steps are counted on the device, and only the
log, checkpoint and evaluation hooks read the device (they, and the batch's copy to the device,
allow transfers explicitly), so step k+1 is dispatched while step k runs.

    summary = train(cfg, workdir)       # cfg: a configs/<name>.py ConfigDict (training/defaults.py)

Resuming is `init_or_restore` + the data order of the step (data/pipeline.py): the latest
checkpoint in the workdir restores onto this run's mesh, whatever the device or process count.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from infllava_jax import distributed, lora, params as params_lib, presets, quant, sharding
from infllava_jax.api import InfLlava
from infllava_jax.checkpoint import load_config
from infllava_jax.config import InfLlavaConfig
from infllava_jax.data.batching import agree_across_processes, image_slots, pad_batch, sum_over_processes
from infllava_jax.data import config as data_config_lib
from infllava_jax.data.pipeline import DataConfig, make_dataset, open_source
from infllava_jax import conversation
from infllava_jax.data.tokenizer import load_tokenizer
from infllava_jax.training import feature_bank, flops, partition, step as step_lib
from infllava_jax.training.checkpoints import TrainCheckpoints
from infllava_jax.training.metrics import MetricsWriter, ThroughputMeter
from infllava_jax.training.preemption import Preemption

log = logging.getLogger("infllava_jax")
BATCH_KEYS = ("input_ids", "labels", "attention_mask", "pixel_values", "segment_ids")   # segment_ids: packing


def train(cfg, workdir, deadlines=None, save_adapters=None) -> dict:
    """Run (or resume) the training of `cfg` in `workdir`; returns a summary (steps, resumed_from,
    seconds, compile_seconds, final_loss, data). `deadlines`: distributed.Deadlines (multi-process).
    `save_adapters(config, params, out_dir, base=...)`: the writer of `lora.export=adapters`
    (train.py passes convert.lora_export.save_adapters; the library does not import the converters)."""
    return Trainer(cfg, workdir, deadlines, save_adapters).fit()


# ----------------------------------------------------------------------------- the run's parts

def model_config(cfg, vocab_size: int) -> InfLlavaConfig:
    """InfLlavaConfig from the init checkpoint or a preset, with the run's runtime settings."""
    if cfg.init_checkpoint:
        mc = load_config(cfg.init_checkpoint)
    else:
        kw = dict(cfg.model)
        preset = kw.pop("preset")
        if preset == "tiny":
            kw["grid"] = kw["grid"] or None      # grid=0: the LLaVA-1.5 path
            kw["vocab_size"] = vocab_size
        mc = getattr(presets, preset)(**kw)
    if vocab_size > mc.llm.vocab_size:
        raise ValueError(f"tokenizer has {vocab_size} tokens but the model's vocabulary is {mc.llm.vocab_size}")
    mc = mc.replace(llm=mc.llm.replace(lora=lora.from_settings(cfg.get("lora")), quant=lora.base_quant(cfg.get("lora"))))
    return mc.with_runtime(**cfg.runtime)


def trainable_parts(cfg, mc: InfLlavaConfig) -> tuple[str, ...]:
    """The run's trainable top-level parts (step.trainable_parts; LoRA: not the language model)."""
    return step_lib.trainable_parts(cfg.stage, cfg.also_train, with_lora=mc.llm.lora is not None)


def _sizes(micro) -> tuple[int, int]:
    """(longest ids length, most image slots) over local micro-batches."""
    return max(m["input_ids"].shape[1] for m in micro), max(image_slots(m) for m in micro)


def init_parts(cfg) -> dict[str, str]:
    """{top-level part: checkpoint it is taken from} after initialisation."""
    return {"vision_tower": cfg.init_vision_tower} if cfg.init_vision_tower else {}


def init_or_restore(cfg, mc: InfLlavaConfig, mesh, parts, tx, ckpts: TrainCheckpoints):
    """-> (train state on `mesh`, start step, data counters or None). Restored from the latest
    checkpoint when there is one (from shapes: nothing is initialised first); else the
    parameters of cfg.init_checkpoint (or random), then the `init_parts` from their checkpoints."""
    abstract, shardings = partition.state_shardings(mc, parts, tx, mesh)
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    start, state, counts = ckpts.restore_latest(target)       # newest readable one (checkpoints.py)
    if start:
        log.info("resumed from %s at step %d", ckpts.dir / str(start), start)
        return state, start, counts
    if cfg.init_checkpoint:
        params = InfLlava.from_pretrained(cfg.init_checkpoint, mesh=mesh, quant=mc.llm.quant).params  # checks keys and shapes
        log.info("initial weights: %s", cfg.init_checkpoint)
    else:
        params = params_lib.init_params(mc, cfg.seed, mesh)
        log.info("initial weights: random (seed %d)", cfg.seed)
    if init_parts(cfg):
        params = params_lib.load_parts(params, init_parts(cfg), mc, mesh)
        log.info("taken from checkpoints: %s", init_parts(cfg))
    if mc.llm.lora is not None and cfg.init_checkpoint:    # a checkpoint has no adapters: fresh ones
        params = lora.combine(params, params_lib.init_adapters(mc, cfg.seed, mesh))
        log.info("LoRA %s: fresh adapters (seed %d)", mc.llm.lora, cfg.seed)
    params = quant.hold(params)        # int4 in int8 on CPU, as the step is compiled (quant.held)
    state = jax.jit(lambda p: step_lib.init_state(p, parts, tx, mc), out_shardings=shardings)(params)
    return state, 0, None


def data_config(cfg, mc: InfLlavaConfig, workdir: Path, per_process_batch: int) -> DataConfig:
    """The pipeline's config: every field of `cfg.data` (data/config.py), the rest from the run.
    `data.synthetic` without a path: the demo set in WORKDIR/synthetic_data (written once, by process 0)."""
    d = cfg.data
    path, folder = d.path, d.image_folder
    if d.synthetic and not path:
        from infllava_jax.study import scenes
        root = workdir / "synthetic_data"
        if jax.process_index() == 0:
            meta = scenes.generate(root, seed=0)       # 252 px; the pipeline resizes to the model's input
            log.info("data.synthetic: the demo dataset %s %s", "reused from" if meta.get("reused") else "written to",
                     root)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices("synthetic data")
        path = str(root / ("train_caption.json" if cfg.stage == "stage1" else "train_vqa.json"))
        folder = str(root)
    kw = {**data_config_lib.from_training(dict(d)), "data_path": path, "image_folder": folder}
    return DataConfig.for_model(mc, stage=int(cfg.stage[-1]), batch_size=per_process_batch, seed=cfg.seed, **kw)


def accumulation_steps(cfg, mesh) -> int:
    """Micro-batches per step: global_batch = micro_batch x processes x this."""
    P = jax.process_count()
    rows = sharding.data_parallel_size(mesh)                # the batch axis is split over data x fsdp
    if (cfg.micro_batch * P) % rows:
        raise ValueError(f"config.micro_batch={cfg.micro_batch} x {P} processes does not split "
                         f"over the mesh's data x fsdp = {rows} devices ({dict(mesh.shape)})")
    accum = cfg.global_batch // (cfg.micro_batch * P)
    if accum < 1 or accum * cfg.micro_batch * P != cfg.global_batch:
        raise ValueError(f"global_batch {cfg.global_batch} is not micro_batch {cfg.micro_batch} x "
                         f"{P} processes x an integer number of accumulation steps")
    return accum


@dataclasses.dataclass
class Hook:
    every: int
    fn: Callable[[int, dict], None]       # (step, the step's metrics, still on device)
    at_end: bool = False                  # also after the last step

    def due(self, step: int, last: int) -> bool:
        return step % self.every == 0 or (self.at_end and step == last)


# ----------------------------------------------------------------------------- the loop

class Trainer:
    """One training run: mesh, model config, state, data, compiled steps, hooks."""

    def __init__(self, cfg, workdir, deadlines=None, save_adapters=None):
        self.t0 = time.perf_counter()
        self.cfg, self.workdir, self.deadlines = cfg, Path(workdir).absolute(), deadlines
        if cfg.lora.rank and cfg.lora.get("export", "merged") == "adapters" and save_adapters is None:
            raise ValueError("lora.export=adapters: pass save_adapters (train.py passes convert.lora_export.save_adapters)")
        self.save_adapters = save_adapters
        self.preemption = Preemption(cfg.get("preemption_signal", "SIGUSR1"))   # SIGTERM, Ctrl-C, ...
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.arm("start-up (model, data, checkpoint restore)", compiling=True)
        _quiet_logs()
        self.cache = cfg.compilation_cache_dir or str(Path.home() / ".cache" / "infllava_jax" / "xla")
        jax.config.update("jax_compilation_cache_dir", self.cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
        jax.config.update("jax_threefry_partitionable", True)     # random bits need no gather when sharded
        self.mesh = sharding.make_mesh(dict(cfg.mesh))
        self.tok = load_tokenizer(cfg.tokenizer or None)
        self.mc = model_config(cfg, len(self.tok))
        self.accum = accumulation_steps(cfg, self.mesh)
        self.parts = trainable_parts(cfg, self.mc)
        o = cfg.optimizer
        self.tx, schedule = step_lib.make_optimizer(o.lr, cfg.total_steps, o.warmup_ratio, o.weight_decay,
                                                    max_grad_norm=o.max_grad_norm or None,
                                                    lr_mult=dict(o.get("lr_mult", {})))
        self.ckpts = TrainCheckpoints(self.workdir, keep=cfg.keep_checkpoints)
        self.state, self.start, counts = init_or_restore(cfg, self.mc, self.mesh, self.parts, self.tx, self.ckpts)
        self.bank = self._feature_bank()
        self.data = self._data(counts)
        _, state_sh = partition.state_shardings(self.mc, self.parts, self.tx, self.mesh)
        self.step_fn = jax.jit(step_lib.make_train_step(self.mc, self.tx, schedule, cfg.loss_chunk,
                                                        features=self.bank is not None,
                                                        loss_positions=cfg.get("loss_positions", 0)),
                               in_shardings=(state_sh, None), out_shardings=(state_sh, None), donate_argnums=0)
        self.compiled, self.compile_seconds, self.final_loss = {}, 0.0, None
        # skipped steps: counted on the device, read at log steps (`skipped_logged`: the last read)
        self.skipped = jax.device_put(np.int32(0), sharding.replicated(self.mesh))
        self.skipped_logged = 0
        self._count = jax.jit(lambda n, skipped: n + skipped.astype(jnp.int32))
        peak, note = flops.peak_flops()
        log.info("MFU denominator: %s", note)
        self.meter = ThroughputMeter(peak)
        self.writer = MetricsWriter(self.workdir, cfg.total_steps, enabled=jax.process_index() == 0,
                                    start=self.start)          # cut back to the restored step
        self.hooks = [Hook(cfg.log_every, self.log_metrics, at_end=True),
                      Hook(cfg.checkpoint_every, self.save, at_end=True)]
        if cfg.eval_every:
            self.hooks.append(Hook(cfg.eval_every, self.evaluate))
        if deadlines:
            self.hooks.append(Hook(1, lambda step, _: self.arm(f"step {step + 1}")))

    def _data(self, counts):
        """This process's batch iterator from the start step's micro-batch on (data/pipeline.py)."""
        cfg, b, P, p = self.cfg, self.cfg.micro_batch, jax.process_count(), jax.process_index()
        k = self.start * self.accum
        self.data_cfg = data_config(cfg, self.mc, self.workdir, b)   # also what final/ records (usage)
        it = iter(make_dataset(self.data_cfg, self.tok, start=k, features=self.bank))
        if counts and p == 0:                     # the totals so far; the other processes count anew
            it.set_stats(counts)
        log.info("mesh %s; model grid %s, %d tokens/image; %s; %d accumulation steps of %d per process",
                 dict(self.mesh.shape), self.mc.grid, self.mc.tokens_per_image, "+".join(self.parts), self.accum, b)
        if P > 1:
            log.info("process %d of %d (%d local devices): reads rows [%d, %d) of every global micro-batch of %d",
                     p, P, jax.local_device_count(), p * b, (p + 1) * b, P * b)
        if k:
            log.info("data: from global micro-batch %d (stream position %d): process %d of %d starts at its row %d",
                     k, k * P * b, p, P, k * b)
        return it

    def _feature_bank(self):
        """data.feature_bank: the frozen tower's features of every image (feature_bank.py), or None."""
        if not self.cfg.data.get("feature_bank", False):
            return None
        if "vision_tower" in self.parts:
            raise ValueError(f"config.data.feature_bank=True needs a frozen vision tower, but this run trains "
                             f"{'+'.join(self.parts)}")
        dc = data_config(self.cfg, self.mc, self.workdir, self.cfg.micro_batch)
        if os.path.isdir(dc.data_path):
            raise NotImplementedError(f"config.data.feature_bank=True reads LLaVA JSON/JSONL records, not the "
                                      f"ArrayRecord build {dc.data_path}")
        records, processor = open_source(dc, self.tok)
        with jax.transfer_guard("allow"):
            return feature_bank.build(self.mc, self.params(), records, processor, self.mesh)

    def arm(self, what: str, compiling: bool = False) -> None:
        if self.deadlines:
            self.deadlines.arm(what, compiling)

    def global_batch(self) -> dict:
        """The next `accum` micro-batches of every process, padded to one length, as global arrays
        (accumulation steps, batch, ...) with the batch axis over (data, fsdp)."""
        pad = self.tok.pad_token_id
        micro = [next(self.data) for _ in range(self.accum)]
        L, K = _sizes(micro)
        # the step's one intended host->device copy (with several processes, the length agreement
        # and make_array_from_process_local_data count as implicit transfers)
        with jax.transfer_guard("allow"):
            micro = [agree_across_processes(pad_batch(m, L, pad, K), pad) for m in micro]
            L, K = _sizes(micro)
            local = {k: np.stack([pad_batch(m, L, pad, K)[k] for m in micro]) for k in BATCH_KEYS if k in micro[0]}
            return {k: jax.make_array_from_process_local_data(sharding.batch_sharding(self.mesh, v.ndim, 1), v)
                    for k, v in local.items()}

    def run_step(self, step: int, batch: dict):
        """One optimizer step; a batch shape seen for the first time is compiled first (timed,
        under the compile deadline, left out of the throughput)."""
        shape = batch["input_ids"].shape
        if shape not in self.compiled:
            self.arm(f"step {step} (compiling for micro-batches {shape})", compiling=True)
            t = time.perf_counter()
            self.compiled[shape] = self.step_fn.lower(self.state, batch).compile()
            # a process that read the compile cache can be minutes ahead of one compiling, and the
            # first collective's gloo set-up waits only 30 s: meet first (under the compile deadline)
            distributed.barrier(f"compiled {shape}", self.deadlines.compile_s if self.deadlines else 3600)
            self.compile_seconds += time.perf_counter() - t
            log.info("compiled the train step for micro-batches %s in %.1f s (cache %s)", shape,
                     time.perf_counter() - t, self.cache)
            self.meter.restart()
        A, b, L = shape
        K = 1 if batch["pixel_values"].ndim == 5 else batch["pixel_values"].shape[2]   # (A, b[, K], S, S, 3)
        # spliced length (packed rows: L ids are L positions)
        seq = L if "segment_ids" in batch else L + K * (self.mc.tokens_per_image - 1)
        self.meter.add(A * b * seq, flops.train_step_flops(self.mc, A * b, seq, self.parts))
        self.state, metrics = self.compiled[shape](self.state, batch)
        self.skipped = self._count(self.skipped, metrics["skipped"])
        return {**metrics, "seq_len": seq}

    def fit(self) -> dict:
        """The steps under `transfer_guard("disallow")`: an implicit copy fails instead of stalling
        (a numpy value handed to the device; on GPU/TPU also a `bool(x)` of a device value; CPU
        buffers are host memory, so there the guard checks host-to-device copies only)."""
        with jax.set_mesh(self.mesh), jax.transfer_guard("disallow"):
            for step in range(self.start + 1, self.cfg.total_steps + 1):
                metrics = self.run_step(step, self.global_batch())
                # preempted (all processes agree on the step): the at-end hooks log and save it
                last = step if self.preemption.reached(step - self.start) else self.cfg.total_steps
                for hook in self.hooks:
                    if hook.due(step, last):
                        hook.fn(step, metrics)
                if last < self.cfg.total_steps:
                    return self.stopped(step)
        self.preemption.uninstall()
        return self.finish()

    def stopped(self, step: int) -> dict:
        """Preempted or interrupted at `step` (training/preemption.py): its checkpoint completes
        (under the step deadline), one line says where it is, exit 0 (130 after Ctrl-C)."""
        self.arm(f"the preemption checkpoint of step {step}")
        self.ckpts.wait()
        self.ckpts.close()
        self.writer.close()
        self.preemption.leave(step, self.ckpts.dir / str(step))
        return {"steps": step, "resumed_from": self.start, "preempted_at": step,
                "seconds": round(time.perf_counter() - self.t0, 1), "final_loss": self.final_loss}

    # -- hooks ------------------------------------------------------------------------------------
    def log_metrics(self, step: int, m: dict) -> None:
        with jax.transfer_guard("allow"):        # a sync point (several processes: the counts' all-gather)
            self._log_metrics(step, m)

    def _log_metrics(self, step: int, m: dict) -> None:
        m, skipped = jax.device_get((m, self.skipped))
        if skipped > self.skipped_logged:
            log.warning("%d of the steps up to %d skipped, not trained on (no supervised token or a "
                        "non-finite loss); %d in all", skipped - self.skipped_logged, step, skipped)
        self.skipped_logged = int(skipped)
        self.final_loss = float(m["loss"])
        self.writer.write(step, {
            "loss": float(m["loss"]), "lr": float(m["lr"]), "grad_norm": float(m["grad_norm"]),
            "supervised_tokens": int(m["tokens"]), **self.meter.report(), "skipped_steps": int(skipped),
            "bad_samples": sum_over_processes(self.data.stats())["bad_total"], "seq_len": m["seq_len"]})

    def save(self, step: int, _) -> None:
        with jax.transfer_guard("allow"):        # a sync point: Orbax copies the state to the host
            self.ckpts.save(step, self.state, sum_over_processes(self.data.stats()))

    def evaluate(self, step: int, _) -> None:
        """Score `cfg.eval_config` (configs/eval.py arguments) on `cfg.eval_data` with the in-memory
        parameters (no checkpoint round trip), on the training mesh; logged as eval/<task>@<res>."""
        from infllava_jax.evaluation.config import get_config
        from infllava_jax.evaluation import scorers, sweep

        ecfg = get_config(self.cfg.eval_config)
        ecfg.mesh = ",".join(f"{k}={v}" for k, v in self.mesh.shape.items())
        ecfg.progress = False
        t = time.perf_counter()
        with jax.transfer_guard("allow"):        # a sync point: evaluation moves data both ways
            summary = sweep.run(ecfg, ckpt="(in memory)", data=self.cfg.eval_data,
                                out=str(self.workdir / "eval" / f"step_{step}"), log=log.info,
                                model=InfLlava(self.mc, self.params(), usage=self.usage()), tokenizer=self.tok)
        scores = {f"eval/{task}@{res}": scorers.main_metric(rec["metrics"])
                  for task, by_res in summary["results"].items() for res, rec in by_res.items() if rec.get("metrics")}
        log.info("step %d eval (%.1f s): %s", step, time.perf_counter() - t, json.dumps(scores))
        self.writer.write_eval(step, scores)
        self.meter.restart()

    # -- the end ------------------------------------------------------------------------------------
    def params(self) -> dict:
        return lora.combine(self.state["frozen"], self.state["params"])

    def usage(self) -> conversation.Usage:
        """How the trained model is used: what training fed it (conversation.training_usage)."""
        return conversation.training_usage(self.cfg.tokenizer, self.data_cfg)

    def export(self) -> None:
        """WORKDIR/final: our checkpoint, LoRA adapters merged into the base (lora.merge); with
        lora.export=adapters also WORKDIR/final_lora, PEFT / LLaVA files (convert/lora.py)."""
        mc, trained, final = self.mc, self.params(), self.workdir / "final"
        params = trained
        if mc.llm.lora is not None:
            mc = lora.merged_config(self.mc)
            like = params_lib.abstract_params(mc)
            merge = jax.jit(lambda p: lora.merge(self.mc, p, like), out_shardings=params_lib.param_shardings(mc, self.mesh))
            params = merge(params)
        # with usage.json and the tokenizer (its files, or "tiny"): final/ is ready for chat / eval.py
        InfLlava(mc, params, usage=self.usage(), tokenizer=self.cfg.tokenizer or "tiny").save_pretrained(final)
        log.info("wrote %s (InfLlava.from_pretrained)", final)
        if self.mc.llm.lora is not None and self.cfg.lora.get("export", "merged") == "adapters":
            self.save_adapters(self.mc, trained, self.workdir / "final_lora", base=self.cfg.init_checkpoint)
            log.info("wrote %s (PEFT adapters + non_lora_trainables.bin)", self.workdir / "final_lora")

    def finish(self) -> dict:
        self.arm("the last checkpoint and the export", compiling=True)
        self.ckpts.wait()
        stats = sum_over_processes(self.data.stats())
        log.info("data: %s", json.dumps(stats))
        if self.cfg.export_final:
            self.export()
        self.ckpts.close()
        self.writer.close()
        return {"steps": self.cfg.total_steps, "resumed_from": self.start,
                "seconds": round(time.perf_counter() - self.t0, 1), "compile_seconds": round(self.compile_seconds, 1),
                "final_loss": self.final_loss, "data": stats}


def _quiet_logs() -> None:
    logging.getLogger("absl").setLevel(logging.WARNING)   # Orbax's per-save chatter
    logging.getLogger().setLevel(logging.WARNING)
    log.setLevel(logging.INFO)
