"""Legacy lmms-eval plugin layout: `<plugin>.models.AVAILABLE_MODELS` {name: class name}."""
AVAILABLE_MODELS = {"infllava_jax": "InfLlavaJax"}
