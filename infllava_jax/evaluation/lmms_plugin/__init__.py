"""lmms-eval plugin: registers the model `infllava_jax` (see ../lmms_adapter.py, docs/evaluation-lmms.md).

Entry point (lmms-eval >= 0.4): `pip install --no-deps -e infllava_jax/evaluation/lmms_plugin`
(a metadata-only distribution declaring the `lmms_eval.models` entry point), with this
repository importable. Legacy route: `LMMS_EVAL_PLUGINS=infllava_jax.evaluation.lmms_plugin`
(lmms-eval reads `models.AVAILABLE_MODELS` and adds the `tasks` directory to its task path).
"""
