"""Legacy lmms-eval plugin layout: `<plugin>.models.<name>.<class>`."""
from infllava_jax.evaluation.lmms_adapter import InfLlavaJax  # noqa: F401
