"""Converters between PyTorch checkpoints and ours.

    python -m convert SRC DST [--vision-tower CLIP_DIR] [--llm LLAMA_DIR] [--dtype ...] [--verify]
    python -m convert.export CKPT DST [--format released|hf]

Tables are data (`key_map(config)` of infllava_jax.vision / llama / dem / projector, composed per
source format in formats.py); engine.py applies a table in both directions, tensor by tensor;
sources.py reads checkpoints lazily, writers.py writes safetensors. In Python:
`convert.importer.convert(src, dst)`, `convert.importer.load(src, mesh=...)` (in memory, sharded),
`convert.export.export(ckpt, dst)`, `convert.verify.verify(source, ckpt)`.
"""
