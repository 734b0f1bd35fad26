"""What the benchmarks share: median wall times of calls."""
import statistics
import time


def interleaved(fns, n: int) -> list[float]:
    """Median seconds of each of `fns` over n rounds that call each once, in turn (after one
    warm-up call each, which also compiles): background load then hits every side alike."""
    for f in fns:
        f()
    ts = [[] for _ in fns]
    for _ in range(n):
        for f, t in zip(fns, ts):
            t0 = time.perf_counter()
            f()
            t.append(time.perf_counter() - t0)
    return [statistics.median(t) for t in ts]


def timed(fn, n: int) -> float:
    """Median seconds of `n` calls of fn(), after one warm-up call."""
    return interleaved([fn], n)[0]
