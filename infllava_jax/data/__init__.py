"""Data: tokenizer, conversation templates, grain pipeline, ArrayRecord builder (docs/model.md sections 2, 6, 7).

    tokenizer.py   tiny Llama-3-like BPE / a real HF tokenizer (Llama-3, LLaVA-1.5 Vicuna)
    template.py    `llama3` and `plain` templates -> (input_ids, labels); generation prompts
    images.py      file -> uint8 at the training size -> CLIP-normalised float32
    examples.py    one LLaVA record -> example or a counted bad sample; truncation
    batching.py    right padding to a few length buckets (static shapes); K image slots per row
    packing.py     several conversations per row (segment ids), planned from the stream
    pipeline.py    DataConfig, make_dataset: sharded, shuffled, checkpointable grain pipeline
    arrayrecord.py tfds ArrayRecord builder (pre-tokenised, pre-resized) and its reader (no TF)
"""
from infllava_jax.data.pipeline import DataConfig, make_dataset
from infllava_jax.data.template import build_prompt, encode_conversation
from infllava_jax.data.tokenizer import build_tiny_tokenizer, load_tokenizer

__all__ = ["DataConfig", "make_dataset", "build_prompt",
           "encode_conversation", "build_tiny_tokenizer", "load_tokenizer"]
