"""lmms-eval plugin: registers the model `infllava_jax` (see ../lmms_adapter.py).

lmms-eval >= 0.4 (entry points): `pip install --no-deps -e infllava_jax/evaluation/lmms_plugin`
(a metadata-only distribution declaring the `lmms_eval.models` entry point), with this
repository importable (PYTHONPATH). lmms-eval 0.2 (2024): `LMMS_EVAL_PLUGINS=infllava_jax.evaluation.lmms_plugin`.
"""
