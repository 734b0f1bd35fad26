"""Test set-up: 8 fake CPU devices, fp32 matmuls at full precision, offline Hugging Face, and a
persistent XLA compilation cache shared by the tests and the programs they start.

The cache (`~/.cache/infllava_jax/xla-tests`, at most 2 GiB, least recently used evicted; set
JAX_COMPILATION_CACHE_DIR to move it) holds every compiled program by its HLO: a test that
compiles a program another test (or an earlier run) compiled reads it from disk, so a second run
of the suite spends about half the CPU time of the first.
"""
import os
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(Path.home() / ".cache" / "infllava_jax" / "xla-tests"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")   # the tests' programs are small
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(2 << 30))

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
