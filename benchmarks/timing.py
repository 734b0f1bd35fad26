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


def gemm_rates(shapes, n: int = 20) -> list[dict]:
    """f32 GEMM rate of JAX (jit, default precision) and of PyTorch (its threads as set by the
    caller) on the same (m, k, n) products, timed in alternation: what code made mostly of these
    products can gain or lose at equal work from the GEMM library alone."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    rng, dot, rows = np.random.default_rng(0), jax.jit(jnp.dot), []
    for m, k, n_ in shapes:
        a, b = rng.normal(size=(m, k)).astype(np.float32), rng.normal(size=(k, n_)).astype(np.float32)
        ja, jb, ta, tb = jnp.asarray(a), jnp.asarray(b), torch.from_numpy(a), torch.from_numpy(b)
        t_jax, t_torch = interleaved([lambda: dot(ja, jb).block_until_ready(), lambda: ta @ tb], n)
        flop = 2 * m * k * n_
        rows.append({"shape": [m, k, n_], "jax_flops_per_s": flop / t_jax, "torch_flops_per_s": flop / t_torch,
                     "jax_over_torch": t_torch / t_jax})
    return rows


def gemm_table(rows: list[dict]) -> str:
    return "\n".join(["f32 GEMM (m x k x n)     JAX GFLOP/s  torch GFLOP/s  JAX/torch"] + [
        f"{'x'.join(map(str, r['shape'])):<24}{r['jax_flops_per_s'] / 1e9:>12.0f}{r['torch_flops_per_s'] / 1e9:>15.0f}"
        f"{r['jax_over_torch']:>10.2f}" for r in rows])
