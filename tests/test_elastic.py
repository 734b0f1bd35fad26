"""Elastic resume: a checkpoint of 1 process x 8 devices resumes on 4 devices and on 2 processes
x 2 devices (state and data iterator) with the same losses; the data iterator's position in the
global stream carries over across process counts (with and without bad samples)."""
import json
import shutil

import numpy as np
import pytest

from infllava_jax.data.pipeline import data_stats, make_dataset
from tests.test_data_common import config, data_root, take, tok  # noqa: F401
from tests.test_multihost import STEPS, losses, reference_run, run  # noqa: F401

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
    """8 devices -> 4 (one process): Orbax puts every array on the new mesh; same layout of the
    data (1 process x 8 rows), so the iterator resumes exactly."""
    ref, data = reference_run
    w = resume_from(ref, tmp_path / "w")
    (log,) = run(w, data, 1, 4, "--config.export_final=False")
    assert "mesh {'data': 1, 'fsdp': 4, 'tensor': 1}" in log and f"at step {RESUME_AT}" in log
    assert "elastic resume" not in log
    check_losses(ref, w)


def test_resume_on_more_processes(reference_run, tmp_path):
    """1 process x 8 devices -> 2 processes x 2 devices: each process reads the old iterator
    state, resumes at global stream position 3 x 8 = 24 and takes its 4 rows of each global
    batch: the same global batches, the same losses."""
    ref, data = reference_run
    w = resume_from(ref, tmp_path / "w")
    logs = run(w, data, 2, 2, "--config.export_final=False")
    for p, log in enumerate(logs):
        assert "mesh {'data': 1, 'fsdp': 4, 'tensor': 1}" in log
        assert (f"from 1 process(es) x 8 rows at global position 24 (0 positions skipped): process {p} of 2 "
                f"starts at its row 12") in log
    check_losses(ref, w)
    states = [json.loads((w / "checkpoints" / str(STEPS) / "data" / f"process_{p}-of-2.json").read_text())
              for p in range(2)]
    assert [s["layout"]["process_count"] for s in states] == [2, 2]
    assert [s["position"] for s in states] == [12 + 3 * 4] * 2          # 3 more steps of 4 rows
    assert max(s["global_position"] for s in states) == STEPS * 8
    assert sum(s["good"] for s in states) == STEPS * 8                   # counters carried over


# ----------------------------------------------------------------------------- data iterator

def _cfg(root, b, **kw):
    return config(root, batch_size=b, **kw)


def _elastic(cfg_new, tok, P_new, old_iterators):
    """New iterators for P_new processes, resumed from the old iterators' (JSON) states."""
    states = [json.loads(json.dumps(it.get_state())) for it in old_iterators]
    its = [iter(make_dataset(cfg_new, tok, process_index=p, process_count=P_new)) for p in range(P_new)]
    infos = []
    for it in its:
        assert not it.same_layout(states[0])
        infos.append(it.resume_elastic(states))
    return its, infos


@pytest.mark.parametrize("P_old,P_new", [(1, 2), (2, 1), (2, 3)])
def test_data_resumes_onto_another_process_count(data_root, tok, P_old, P_new):
    """Clean data: the global batches after an elastic resume are exactly those of an
    uninterrupted run (global batch 6 = P x 6/P rows; epochs of 12 samples are crossed)."""
    straight = take(iter(make_dataset(_cfg(data_root, 6), tok, process_index=0, process_count=1)), 7)
    old = [iter(make_dataset(_cfg(data_root, 6 // P_old), tok, process_index=p, process_count=P_old))
           for p in range(P_old)]
    first = [take(it, 3) for it in old]
    its, infos = _elastic(_cfg(data_root, 6 // P_new), tok, P_new, old)
    assert [i["skipped"] for i in infos] == [0] * P_new and infos[0]["global_position"] == 18
    then = [take(it, 4) for it in its]
    got = [np.concatenate([first[p][k]["index"] for p in range(P_old)]) for k in range(3)] + \
          [np.concatenate([then[p][k]["index"] for p in range(P_new)]) for k in range(4)]
    np.testing.assert_array_equal(np.stack(got), np.stack([b["index"] for b in straight]))
    # the counters' totals carry over (to the new process 0)
    assert sum(data_stats(it)["good"] for it in its) == 7 * 6


def test_data_elastic_with_bad_samples(data_root, tok):
    """bad.json: processes skip bad samples independently, so they stand at different stream
    positions; the resume starts after the furthest one (block-aligned): no sample is read twice,
    the positions nobody read are counted, and resuming again with the new layout is exact."""
    cfg = lambda b: _cfg(data_root, b, name="bad.json", max_bad_fraction=1.0)  # noqa: E731
    old = [iter(make_dataset(cfg(3), tok, process_index=p, process_count=2)) for p in range(2)]
    for it in old:
        take(it, 2)
    old_states = [it.get_state() for it in old]
    assert sorted(s["position"] for s in old_states) != [6, 6]   # bad samples were skipped

    def read_positions(it, start, stop):
        return {it.rows.global_index(i) for i in range(start, stop)}

    seen = set().union(*(read_positions(it, 0, s["position"]) for it, s in zip(old, old_states)))
    its, infos = _elastic(cfg(2), tok, 3, old)
    g_old, g_new = max(s["global_position"] for s in old_states), infos[0]["global_position"]
    assert g_old <= g_new < g_old + 6 and g_new % 6 == 0         # block-aligned for 3 x 2 rows
    assert infos[0]["skipped"] == len(set(range(g_new)) - seen) > 0   # never read: logged
    starts = [it.get_state()["position"] for it in its]
    for it in its:
        take(it, 2)
    new = [read_positions(it, s, it.get_state()["position"]) for it, s in zip(its, starts)]
    assert not seen & set().union(*new) and not new[0] & new[1] and not new[1] & new[2]   # no repeats
    assert min(set().union(*new)) == g_new
    # the new layout's own checkpoint resumes exactly
    state = json.loads(json.dumps(its[1].get_state()))
    want = take(its[1], 3)
    again = iter(make_dataset(cfg(2), tok, process_index=1, process_count=3))
    assert again.same_layout(state)
    again.set_state(state)
    for x, y in zip(take(again, 3), want):
        np.testing.assert_array_equal(x["index"], y["index"])


def test_data_elastic_refuses_incomplete_states(data_root, tok):
    old = [iter(make_dataset(_cfg(data_root, 3), tok, process_index=p, process_count=2)) for p in range(2)]
    it = iter(make_dataset(_cfg(data_root, 6), tok, process_index=0, process_count=1))
    with pytest.raises(ValueError, match="all 2 processes"):
        it.resume_elastic([old[0].get_state()])
    with pytest.raises(ValueError, match="cannot resume exactly"):
        it.set_state(old[0].get_state())
    # a state written before layouts were recorded (one process) still resumes elastically
    legacy = iter(make_dataset(_cfg(data_root, 6), tok, process_index=0, process_count=1))
    take(legacy, 2)
    s = {k: v for k, v in legacy.get_state().items() if k not in ("layout", "position", "global_position")}
    new = iter(make_dataset(_cfg(data_root, 3), tok, process_index=1, process_count=2))
    assert new.resume_elastic([s])["global_position"] == 12
