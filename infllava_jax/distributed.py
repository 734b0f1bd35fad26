"""Multi-process start-up and fail-fast behaviour (train.py; README "Scale-out").

Where the settings of `jax.distributed.initialize` come from, first match wins per value:

  1. flags: train.py --coordinator_address, --num_processes, --process_id
  2. the environment: JAX_COORDINATOR_ADDRESS (read by JAX itself), JAX_NUM_PROCESSES,
     JAX_PROCESS_ID (read here)
  3. a cluster, detected as JAX detects it (`detect_cluster`): Slurm (SLURM_JOB_ID,
     SLURM_STEP_NODELIST, SLURM_NTASKS, SLURM_PROCID, SLURM_LOCALID; coordinator = first node of
     the step, port from the job id or JAX_COORDINATOR_PORT), Open MPI (OMPI_*), Cloud TPU pod
     slices (`jax.distributed.initialize()` with no arguments resolves them; GKE's TPU_WORKER_*
     variables are read here for the dry run)
  4. nothing: one process, `jax.distributed` is not used.

`resolve()` does the lookup without starting anything (`python -m infllava_jax.distributed`
prints it: the dry run of the launch recipes); `initialize()` starts the distributed runtime.

Fail-fast, so that a lost host never leaves the others hanging silently:
  * start-up: every process must reach the coordinator within `initialization_timeout` seconds,
    else it prints who it was waiting for and exits with EXIT_INIT (3) (JAX itself would abort
    a few seconds later with a less specific message);
  * a process that stops sending heartbeats for `heartbeat_timeout` seconds (dead, stopped,
    partitioned) is declared failed by the coordinator and JAX ends the others;
  * a collective whose peer died fails at once (gloo on CPU: "Connection closed by peer"):
    train.py logs it and exits with EXIT_FAILED (4) without waiting in the shutdown barrier;
  * a `Watchdog` ends a process whose step (or start-up) makes no progress within its
    deadline, after dumping every thread's stack, with EXIT_HUNG (5): the case of a peer that is
    alive (heartbeats flow) but stuck.
"""
from __future__ import annotations

import dataclasses
import faulthandler
import glob
import json
import logging
import os
import re
import sys
import threading
import time
from pathlib import Path

log = logging.getLogger("infllava_jax")

EXIT_INIT = 3      # the processes did not all meet at the coordinator in time
EXIT_FAILED = 4    # this process failed (often: a peer died and a collective broke)
EXIT_HUNG = 5      # the watchdog fired: no progress within the deadline


@dataclasses.dataclass(frozen=True)
class Cluster:
    """Resolved settings; `source` says where they came from ("single": no jax.distributed)."""
    source: str                              # single | flags | env | slurm | ompi | tpu | auto
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    local_device_ids: tuple[int, ...] | None = None   # None: every local device
    detail: str = ""

    @property
    def distributed(self) -> bool:
        return self.source != "single"

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))


def _int_or_none(x) -> int | None:
    return None if x in (None, "", -1) else int(x)


def _parse_ids(text: str) -> tuple[int, ...]:
    return tuple(int(t) for t in text.split(",") if t.strip())


# ----------------------------------------------------------------------------- cluster detection
# What JAX's own auto-detection reads (its cluster classes are private): Slurm and Open MPI from
# their variables; a Cloud TPU slice from its PCI devices, resolved by jax.distributed itself.

@dataclasses.dataclass(frozen=True)
class Detected:
    name: str                   # slurm | ompi | tpu
    label: str                  # what the settings say was detected
    num_processes: int | None = None
    process_id: int | None = None
    local_process_id: int | None = None
    tasks_on_node: int = 1
    coordinator_host: str | None = None
    default_port: int | None = None


def _ephemeral_port(job_id: int) -> int:
    """A port in [65535 - 2^12 + 1, 65535] from a job id (as JAX picks it)."""
    return job_id % 2 ** 12 + (65535 - 2 ** 12 + 1)


def _slurm(env) -> Detected | None:
    if not all(k in env for k in ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
                                  "SLURM_LOCALID")):
        return None
    # first host of 'node001', 'node001,host2', 'node[001-015],host2' or 'node[001,007-015],host2'
    m = re.match(r"([^,\[]*)(?:\[([^,\-\]]*))?", env["SLURM_STEP_NODELIST"])
    per_node = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE") or ""
    try:                      # "8(x2)" or "8,8": this node's count is the first entry
        tasks = int(per_node.split(",")[0].split("(")[0])
    except ValueError:
        nodes = int(env.get("SLURM_STEP_NUM_NODES") or env.get("SLURM_NNODES") or 1)
        tasks = max(1, int(env["SLURM_NTASKS"]) // nodes)
    return Detected("slurm", "SlurmCluster", int(env["SLURM_NTASKS"]), int(env["SLURM_PROCID"]),
                    int(env["SLURM_LOCALID"]), tasks, m.group(1) + (m.group(2) or ""),
                    _ephemeral_port(int(env["SLURM_JOB_ID"])))


def _ompi(env) -> Detected | None:
    uri = env.get("OMPI_MCA_orte_hnp_uri")     # e.g. 1531576320.0;tcp://10.96.0.1,10.148.0.1:34911
    if uri is None:
        return None
    m = re.search(r"tcp://(.+?)[,:]|tcp6://\[(.+?)[,\]]", uri)
    if m is None:
        raise ValueError(f"OMPI_MCA_orte_hnp_uri={uri!r}: no coordinator address in it")
    return Detected("ompi", "OmpiCluster", int(env["OMPI_COMM_WORLD_SIZE"]), int(env["OMPI_COMM_WORLD_RANK"]),
                    int(env["OMPI_COMM_WORLD_LOCAL_RANK"]), int(env.get("OMPI_COMM_WORLD_LOCAL_SIZE", "1")),
                    m.group(1) or m.group(2), _ephemeral_port(int(uri.split(".", 1)[0]) // 2 ** 12))


def _on_cloud_tpu() -> bool:
    """A Cloud TPU VM: Google TPU chips on the PCI bus (the test JAX applies)."""
    return any(Path(v).read_text().strip() == "0x1ae0" for v in glob.glob("/sys/bus/pci/devices/*/vendor"))


def _tpu(env) -> Detected | None:
    if not _on_cloud_tpu():
        return None
    hosts = env.get("TPU_PROCESS_ADDRESSES") or env.get("TPU_WORKER_HOSTNAMES")   # GKE; on GCE: metadata
    if not hosts:
        return Detected("tpu", "CloudTpu")
    hosts = hosts.split(",")
    return Detected("tpu", "GkeTpuCluster", len(hosts), int(env.get("TPU_WORKER_ID", "0")), None, 1,
                    hosts[0].split(":")[0], 8482)


def detect_cluster(env=None) -> Detected | None:
    """The multi-process cluster the environment describes, or None. K8s and mpi4py detection stay
    opt-in (distributed="on" lets jax.distributed.initialize() try them)."""
    env = os.environ if env is None else env
    for find in (_slurm, _ompi, _tpu):
        found = find(env)
        if found is not None:
            return found
    return None


def resolve(coordinator_address: str | None = None, num_processes: int | None = None,
            process_id: int | None = None, local_device_ids: str = "auto", mode: str = "auto",
            query_tpu: bool = False) -> Cluster:
    """The settings `initialize` will use (see the module docstring); starts nothing.

    mode: "auto" (distributed when flags, environment or a multi-process cluster say so),
    "on" (always, with JAX's auto-detection for what is unset), "off" (never).
    local_device_ids: "auto" (one device per process when the cluster runs several processes on
    this node, as JAX does on Slurm/Open MPI GPU nodes; all local devices otherwise), "all", or
    "0,1,...". On TPU JAX never restricts devices.
    """
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"distributed mode {mode!r}; expected auto, on or off")
    if mode == "off":
        return Cluster("single", detail="distributed=off")
    given, source = _given(coordinator_address, num_processes, process_id)
    found = detect_cluster() if None in given.values() else None
    detail = ""
    if found:
        detail = f"{found.label} detected"
        if found.name == "tpu" and not query_tpu:
            # JAX resolves TPU pods itself (metadata server, DNS); leave the unset values to it
            return Cluster("tpu" if source is None else source, *given.values(), None,
                           detail + "; jax.distributed.initialize() resolves the rest")
        _fill_from(given, found, mode)
        source = source or found.name
    if source is None or (given["num_processes"] == 1 and mode == "auto"):
        if mode == "on":
            return Cluster("auto", *given.values(), detail="distributed=on: jax.distributed.initialize() "
                           "auto-detects the unset values")
        return Cluster("single", num_processes=1, process_id=0,
                       detail=detail or "no flags, JAX_* variables or multi-process cluster")
    missing = [k for k, v in given.items() if v is None]
    if missing:
        raise ValueError(f"multi-process settings from {source}: {given}; missing {missing} (pass "
                         f"--{' --'.join(missing)} or the JAX_* environment variables)")
    if not 0 <= given["process_id"] < given["num_processes"]:
        raise ValueError(f"process_id {given['process_id']} is not in [0, {given['num_processes']})")
    return Cluster(source, *given.values(), _local_devices(local_device_ids, found), detail)


def _given(coordinator_address, num_processes, process_id) -> tuple[dict, str | None]:
    """Settings from the flags, then the JAX_* variables; and where the first came from."""
    env = os.environ
    given = {"coordinator_address": coordinator_address or None, "num_processes": _int_or_none(num_processes),
             "process_id": _int_or_none(process_id)}
    source = "flags" if any(v is not None for v in given.values()) else None
    for key, var in (("coordinator_address", "JAX_COORDINATOR_ADDRESS"), ("num_processes", "JAX_NUM_PROCESSES"),
                     ("process_id", "JAX_PROCESS_ID")):
        if given[key] is None and env.get(var):
            given[key] = env[var] if key == "coordinator_address" else int(env[var])
            source = source or "env"
    return given, source


def _fill_from(given: dict, found: Detected, mode: str) -> None:
    """The unset settings from a detected cluster (the coordinator only when it is needed)."""
    if given["num_processes"] is None:
        given["num_processes"] = found.num_processes
    if given["process_id"] is None:
        given["process_id"] = found.process_id
    if given["coordinator_address"] is None and found.coordinator_host and \
            (given["num_processes"] > 1 or mode == "on"):
        port = os.environ.get("JAX_COORDINATOR_PORT") or found.default_port
        given["coordinator_address"] = f"{found.coordinator_host}:{port}"


def _local_devices(spec: str, found: Detected | None) -> tuple[int, ...] | None:
    if spec == "all":
        return None
    if spec != "auto":
        return _parse_ids(spec)
    if found and found.name in ("slurm", "ompi") and found.tasks_on_node > 1:
        return (found.local_process_id,)
    if os.environ.get("JAX_LOCAL_DEVICE_IDS"):
        return _parse_ids(os.environ["JAX_LOCAL_DEVICE_IDS"])
    return None


def initialize(cluster: Cluster, *, initialization_timeout: int = 300, heartbeat_timeout: int = 100,
               shutdown_timeout: int = 300) -> Cluster:
    """Start jax.distributed for `cluster` (a no-op for "single"); CPU collectives use gloo.
    Exits the process with EXIT_INIT and a clear message when the start-up does not complete
    within `initialization_timeout` seconds. Call before anything touches a JAX device."""
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if not cluster.distributed:
        return cluster
    who = (f"process {cluster.process_id if cluster.process_id is not None else '?'} of "
           f"{cluster.num_processes or '?'} (coordinator {cluster.coordinator_address or 'auto-detected'}, "
           f"from {cluster.source})")
    log.info("jax.distributed.initialize: %s; timeouts: start-up %d s, heartbeat %d s",
             who, initialization_timeout, heartbeat_timeout)
    dog = Watchdog(exit_code=EXIT_INIT, dump_stacks=False)
    dog.arm(initialization_timeout,
            f"jax.distributed.initialize: {who} did not complete its start-up within "
            f"--initialization_timeout={initialization_timeout} s: not every process reached the "
            f"coordinator. Check that all {cluster.num_processes or ''} processes were started, that "
            f"process 0 runs at the coordinator address and that its port is reachable from this host.")
    kw = dict(coordinator_address=cluster.coordinator_address, num_processes=cluster.num_processes,
              process_id=cluster.process_id,
              local_device_ids=list(cluster.local_device_ids) if cluster.local_device_ids else None,
              initialization_timeout=int(initialization_timeout), heartbeat_timeout_seconds=int(heartbeat_timeout),
              shutdown_timeout_seconds=int(shutdown_timeout))
    if cluster.source != "tpu" and None not in (cluster.coordinator_address, cluster.num_processes,
                                                cluster.process_id):
        kw["cluster_detection_method"] = "deactivate"    # resolved here; keep local_device_ids as given
    t0 = time.perf_counter()
    try:
        jax.distributed.initialize(**kw)
    except Exception as e:
        dog.disarm()
        raise RuntimeError(f"jax.distributed.initialize failed for {who}: {e}") from e
    dog.disarm()
    log.info("jax.distributed: process %d of %d up in %.1f s", jax.process_index(), jax.process_count(),
             time.perf_counter() - t0)
    return cluster


def barrier(name: str, timeout_s: float) -> None:
    """Wait until every process gets here (the coordination service's barrier: host-side, no
    collective), at most `timeout_s`. A no-op with one process."""
    import jax
    if jax.process_count() > 1:
        from orbax.checkpoint import multihost
        multihost.get_barrier_sync_fn()(key=name, timeout_ms=int(timeout_s * 1000))


def fail_fast(exc: BaseException, what: str) -> None:
    """Multi-process: log `exc` with a clear message and end this process at once with
    EXIT_FAILED (no shutdown barrier: the other processes' collectives then fail fast too)."""
    import traceback
    msg = (f"{what} failed: {type(exc).__name__}: {exc}\n"
           "In a multi-process run a failed collective or transfer (e.g. 'Connection closed by peer', "
           "'heartbeat', 'DEADLINE_EXCEEDED') usually means another process died or hung: see its log. "
           f"Ending this process now with exit code {EXIT_FAILED}.")
    traceback.print_exception(exc, file=sys.stderr)
    log.critical(msg)
    _exit(EXIT_FAILED)


def _exit(code: int) -> None:
    for h in logging.getLogger().handlers + log.handlers:
        try:
            h.flush()
        except Exception:
            pass
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


class Watchdog:
    """Ends the process (all threads' stacks to stderr, a message, then `exit_code`) when it
    stays armed past its deadline. `arm(seconds, message)` (re)starts the clock, `disarm()`
    stops it. One daemon thread; re-arming is cheap (call it every step)."""

    def __init__(self, exit_code: int = EXIT_HUNG, dump_stacks: bool = True):
        self.exit_code, self.dump_stacks = exit_code, dump_stacks
        self._deadline: float | None = None
        self._message = ""
        self._cv = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="infllava-watchdog", daemon=True)
        self._thread.start()

    def arm(self, seconds: float, message: str) -> None:
        with self._cv:
            self._deadline, self._message = time.monotonic() + float(seconds), message
            self._cv.notify()

    def disarm(self) -> None:
        with self._cv:
            self._deadline = None
            self._cv.notify()

    def _run(self) -> None:
        with self._cv:
            while True:
                if self._deadline is None:
                    self._cv.wait()
                    continue
                left = self._deadline - time.monotonic()
                if left > 0:
                    self._cv.wait(left)
                    continue
                if self.dump_stacks:
                    sys.stderr.write("\n--- watchdog: stacks of all threads ---\n")
                    faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
                sys.stderr.write(f"\nFATAL (watchdog): {self._message}\nExiting with code {self.exit_code}.\n")
                log.critical("watchdog: %s", self._message)
                _exit(self.exit_code)


class Deadlines:
    """A training run's bounded waits (multi-process): `arm(what)` gives the next stretch of work
    `step_s` seconds (a step, a checkpoint save, an evaluation), `arm(what, compiling=True)`
    `compile_s` (start-up, a step that compiles); past it a Watchdog ends the process."""

    def __init__(self, step_s: float, compile_s: float):
        self.step_s, self.compile_s, self.dog = step_s, compile_s, Watchdog()

    def arm(self, what: str, compiling: bool = False) -> None:
        import jax
        s = self.compile_s if compiling else self.step_s
        self.dog.arm(s, f"process {jax.process_index()} of {jax.process_count()}: {what} made no progress in "
                        f"{s} s. A collective is probably waiting for a process that hangs, was stopped or lost "
                        "its network: see the other processes' logs (raise --step_timeout/--compile_timeout for "
                        "slow steps)")

    def disarm(self) -> None:
        self.dog.disarm()


def main(argv=None) -> int:
    """Dry run: print the resolved settings of this process as JSON (no start-up)."""
    import argparse
    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--coordinator_address", default=None)
    ap.add_argument("--num_processes", type=int, default=None)
    ap.add_argument("--process_id", type=int, default=None)
    ap.add_argument("--local_device_ids", default="auto")
    ap.add_argument("--distributed", default="auto", choices=("auto", "on", "off"))
    ap.add_argument("--query_tpu", action="store_true", help="also resolve a TPU slice (from GKE's TPU_WORKER_* variables)")
    a = ap.parse_args(argv)
    c = resolve(a.coordinator_address, a.num_processes, a.process_id, a.local_device_ids, a.distributed,
                query_tpu=a.query_tpu)
    print(c.to_json())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
