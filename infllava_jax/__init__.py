"""infllava_jax: INF-LLaVA (arXiv 2407.16198) in JAX/Flax.

pixels -> crops (DCM) -> vision tower -> DEM -> projector -> language model.
"""
from infllava_jax.api import InfLlava
from infllava_jax.config import InfLlavaConfig

__all__ = ["InfLlava", "InfLlavaConfig"]
