"""Elastic resume: a checkpoint of 1 process x 8 devices resumes on 4 devices and on 2 processes
x 2 devices with the same losses; the data order is a function of the step, so global
micro-batch k is stream positions [k*G, (k+1)*G) on any process count (with and without bad
samples)."""
import json
import shutil

import numpy as np
import pytest

from infllava_jax.data.pipeline import make_dataset
from tests.test_data_common import config, data_root, take, tok  # noqa: F401
from tests.test_multihost import STEPS, losses, reference_run, run  # noqa: F401

pytestmark = pytest.mark.slow   # resumes across meshes and process counts

RESUME_AT = 3


def resume_from(ref, workdir):
    """A new workdir holding only the reference run's checkpoint at step RESUME_AT."""
    (workdir / "checkpoints").mkdir(parents=True)
    shutil.copytree(ref / "checkpoints" / str(RESUME_AT), workdir / "checkpoints" / str(RESUME_AT))
    return workdir


def check_losses(ref, workdir):
    want, got = losses(ref), losses(workdir)
    assert sorted(got) == list(range(RESUME_AT + 1, STEPS + 1))
    np.testing.assert_allclose([got[s] for s in got], [want[s] for s in got], rtol=2e-6)


# ----------------------------------------------------------------------------- training

def test_resume_on_fewer_devices(reference_run, tmp_path):
    """8 devices -> 4 (one process): Orbax puts every array on the new mesh; the data resume at
    the step's position."""
    ref, data = reference_run
    w = resume_from(ref, tmp_path / "w")
    (log,) = run(w, data, 1, 4, "--config.export_final=False")
    assert "mesh {'data': 1, 'fsdp': 4, 'tensor': 1}" in log and f"at step {RESUME_AT}" in log
    assert "elastic resume" not in log
    check_losses(ref, w)


def test_resume_on_more_processes(reference_run, tmp_path):
    """1 process x 8 devices -> 2 processes x 2 devices: each process resumes at global stream
    position 3 x 8 = 24 and takes its 4 rows of each global batch: the same global batches, the
    same losses."""
    ref, data = reference_run
    w = resume_from(ref, tmp_path / "w")
    logs = run(w, data, 2, 2, "--config.export_final=False")
    for p, log in enumerate(logs):
        assert "mesh {'data': 1, 'fsdp': 4, 'tensor': 1}" in log
        assert f"(stream position 24): process {p} of 2 starts at its row 12" in log
    check_losses(ref, w)
    counts = json.loads((w / "checkpoints" / str(STEPS) / "data" / "counts.json").read_text())
    assert counts["good"] == STEPS * 8                  # counters carried over, summed over processes


# ----------------------------------------------------------------------------- data iterator

def _cfg(root, b, **kw):
    return config(root, batch_size=b, **kw)


def _global_batches(cfg, tok, P, n, start=0):
    """n global micro-batches of P processes (each process's rows in process order), and the
    processes' iterators."""
    its = [iter(make_dataset(cfg, tok, start=start, process_index=p, process_count=P)) for p in range(P)]
    local = [take(it, n) for it in its]
    return [np.concatenate([local[p][k]["index"] for p in range(P)]) for k in range(n)], its


@pytest.mark.parametrize("P_old,P_new", [(1, 2), (2, 1), (2, 3)])
def test_data_resumes_onto_another_process_count(data_root, tok, P_old, P_new):
    """Clean data: the global batches after a resume at micro-batch 3 on another process count
    are exactly those of an uninterrupted run (global batch 6 = P x 6/P rows; epochs of 12
    samples are crossed)."""
    straight = take(iter(make_dataset(_cfg(data_root, 6), tok, process_index=0, process_count=1)), 7)
    first, old = _global_batches(_cfg(data_root, 6 // P_old), tok, P_old, 3)
    then, new = _global_batches(_cfg(data_root, 6 // P_new), tok, P_new, 4, start=3)
    np.testing.assert_array_equal(np.stack(first + then), np.stack([b["index"] for b in straight]))
    assert [it.get_state()["position"] for it in new] == [7 * 6 // P_new] * P_new   # from row 3 x 6 / P on
    assert sum(it.stats()["good"] for it in old + new) == 7 * 6


def test_data_elastic_with_bad_samples(data_root, tok):
    """bad.json: a bad sample keeps its slot (an empty row), so the processes never drift apart:
    2 processes x 3 rows, resumed at micro-batch 2 on 3 processes x 2 rows, read the global
    batches of 1 process x 6 rows, and the counters add up to the uninterrupted run's."""
    cfg = lambda b: _cfg(data_root, b, name="bad.json", max_bad_fraction=1.0)  # noqa: E731
    straight, (one,) = _global_batches(cfg(6), tok, 1, 5)
    first, old = _global_batches(cfg(3), tok, 2, 2)
    then, new = _global_batches(cfg(2), tok, 3, 3, start=2)
    np.testing.assert_array_equal(np.stack(first + then), np.stack(straight))
    assert (np.stack(straight) == -1).any()                      # bad samples were met
    for key in ("good", "bad_total"):
        assert sum(it.stats()[key] for it in old + new) == one.stats()[key]
    # each new process's own iterator state still resumes exactly
    state = json.loads(json.dumps(new[1].get_state()))
    want = take(new[1], 3)
    again = iter(make_dataset(cfg(2), tok, start=2, process_index=1, process_count=3))
    again.set_state(state)
    for x, y in zip(take(again, 3), want):
        np.testing.assert_array_equal(x["index"], y["index"])


def _packed_rows(batch):
    return [tuple(int(i) for i in r if i >= 0) for r in batch["index"]]


@pytest.mark.parametrize("P_old,P_new", [(1, 2), (2, 3)])
def test_packed_data_resumes_onto_another_process_count(data_root, tok, P_old, P_new):
    """Packing: a packed row is a function of the global stream, so global micro-batch k is packed
    rows [k*G, (k+1)*G) on any process count: a resume at micro-batch 2 on another process count
    reads the uninterrupted run's global batches, row for row (bad samples, epochs crossed)."""
    cfg = lambda b: _cfg(data_root, b, name="bad.json", packing=True, max_bad_fraction=1.0)  # noqa: E731

    def global_rows(P, n, start=0):
        its = [iter(make_dataset(cfg(6 // P), tok, start=start, process_index=p, process_count=P)) for p in range(P)]
        local = [take(it, n) for it in its]
        return [[r for p in range(P) for r in _packed_rows(local[p][k])] for k in range(n)], its

    straight, (one,) = global_rows(1, 5)
    first, old = global_rows(P_old, 2)
    then, new = global_rows(P_new, 3, start=2)
    assert first + then == straight
    assert max(len(r) for b in straight for r in b) >= 2              # rows really hold several samples
    for key in ("good", "bad_total"):
        assert sum(it.stats()[key] for it in old + new) == one.stats()[key]
