"""What the benchmarks share: the median wall time of a call."""
import statistics
import time


def timed(fn, n: int) -> float:
    """Median seconds of `n` calls of fn(), after one warm-up call (which also compiles)."""
    fn()
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)
