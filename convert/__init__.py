"""Converters between PyTorch checkpoints (released INF-LLaVA, HF CLIP / Llama / LLaVA-1.5) and ours."""
