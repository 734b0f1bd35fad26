"""Serving a checkpoint: the OpenAI-compatible server (`python -m infllava_jax.serve`) and offline
batch prediction (`python -m infllava_jax.predict`), both through `engine.Engine` (docs/serving.md).

    schema.py   the request schema (OpenAI chat completions) and the OpenAI error body
    images.py   image_url -> PIL image: data URLs and paths under the operator's --image-dir, capped
    prompt.py   request messages + images -> prompt ids, pixel arrays and stop ids (one function)
    text.py     generated ids -> text, incrementally, with stop strings
    engine.py   the batching engine over the eval runner's jitted generator
    app.py      the FastAPI application
"""
