"""`python -m convert SRC DST --verify`: the PyTorch model and our converted checkpoint on the
same inputs (the repo's astronaut photo and a prompt of a few hundred tokens), compared as
max |ours - ref| / max |ref| over all logits and per-token KL(ref || ours).

PyTorch side: released INF-LLaVA and the stage starts run `convert.torch_reference` loaded
from the same (virtual) released-layout state dict the converter read; LLaVA-1.5 runs
transformers' LlavaForConditionalGeneration loaded by transformers from SRC. The PyTorch
model runs first and is freed before our checkpoint is loaded, so peak memory is about one
model (an 8B model in bf16: ~17 GB), not two.
"""
from __future__ import annotations

import gc
import math
from pathlib import Path

import numpy as np

from convert.formats import Source

ASTRONAUT = Path(__file__).resolve().parent.parent / "infllava_jax" / "assets" / "astronaut.jpg"
QUESTION = (
    "Describe this photograph in as much detail as you can. Start with the person: what they are wearing, "
    "the colours and markings on the suit, the patches on the chest and on the shoulders, what they hold in "
    "their hands and how they are posing. Then describe the background, the objects behind them, the flags, "
    "any spacecraft models or photographs, and the lighting of the scene. Say whether the photograph looks "
    "like an official portrait or a casual snapshot, and explain which details make you think so. Estimate "
    "roughly when the photograph was taken, judging from the style of the suit, the colours of the print and "
    "the way the portrait is composed. Then list five questions that a museum visitor might ask about this "
    "picture, and answer each of them in two or three sentences, being careful to separate what can be seen "
    "in the picture from what you are guessing. Finally, write a short caption of at most twenty words that "
    "could be printed under the photograph in a magazine, and a longer caption of about sixty words for an "
    "exhibition label, using plain language that a ten year old child would understand without help.")
# fp32: the bar the tests use; 16-bit: rounding of weights and activations dominates
# (a conversion bug -- a swapped or untransposed matrix, a wrong head split -- gives KL of order 1)
THRESHOLDS = {"float32": (1e-4, 1e-6), "bfloat16": (1e-1, 5e-2), "float16": (5e-2, 1e-2)}


def _lowest_precision(config) -> str:
    dts = {config.vision.param_dtype, config.llm.param_dtype}
    if config.dem is not None:
        dts.add(config.dem.param_dtype)
    return min(dts, key=lambda d: {"float32": 2, "float16": 1, "bfloat16": 0}[d])


def prompt_ids(source: Source, n_tokens: int, tokenizer_dirs=()) -> np.ndarray:
    """(1, L) ids with one image token: QUESTION in the family's chat template (INF-LLaVA:
    Llama-3; LLaVA-1.5: Vicuna v1 after BOS) when a tokenizer.json is at hand, else `n_tokens`
    deterministic pseudo-random ids."""
    img, vocab = source.config.image_token_index, source.config.llm.vocab_size
    for d in tokenizer_dirs:
        f = None if d is None else Path(d) / "tokenizer.json"
        if f is not None and f.is_file():
            from tokenizers import Tokenizer
            from infllava_jax import conversation
            from infllava_jax.data.template import IMAGE_TOKEN
            tok = Tokenizer.from_file(str(f))
            template = conversation.family_usage(source.config.dem is not None).template
            before, after = conversation.prompt_text(template, conversation.user_text(QUESTION, 1)).split(IMAGE_TOKEN)
            bos = tok.token_to_id("<s>") if template == "vicuna_v1" else None   # llama3: in the text
            ids = ([] if bos is None else [bos]) + (tok.encode(before, add_special_tokens=False).ids + [img]
                                                    + tok.encode(after, add_special_tokens=False).ids)
            if max(ids) < vocab:
                return np.asarray([ids], np.int64)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, min(vocab, 128000), n_tokens)
    ids[min(30, n_tokens // 4)] = img
    if img >= 0:   # the image token is an ordinary id: keep it out of the text
        ids[(ids == img) & (np.arange(n_tokens) != min(30, n_tokens // 4))] = 0
    return ids[None].astype(np.int64)


def pixels(config) -> np.ndarray:
    """(1, 3, s, s) CLIP-normalised astronaut (the released inference loader's 336 px input)."""
    from PIL import Image

    from infllava_jax.pixels import preprocess
    s = config.sub_image_size
    return np.moveaxis(preprocess(Image.open(ASTRONAUT), size=s, mode="pad"), -1, 0)[None].copy()


def torch_logits(source: Source, ids: np.ndarray, px: np.ndarray) -> np.ndarray:
    import torch
    c = source.config
    if source.kind == "llava-hf":
        import transformers
        from convert.torch_reference import TORCH_DTYPES
        model = transformers.LlavaForConditionalGeneration.from_pretrained(
            source.path, dtype=TORCH_DTYPES[c.llm.param_dtype], attn_implementation="eager").eval()
        if c.vision.param_dtype != c.llm.param_dtype:
            tower = getattr(model, "vision_tower", None) or model.model.vision_tower
            tower.to(TORCH_DTYPES[c.vision.param_dtype])
        T = c.tokens_per_image
        hf_ids = np.concatenate([[t] * T if t == c.image_token_index else [t] for t in ids[0]])[None]
        with torch.no_grad():
            out = model(input_ids=torch.from_numpy(hf_ids), pixel_values=torch.from_numpy(px)).logits.float().numpy()
    else:
        from convert.torch_reference import InfLlavaTorch
        model = InfLlavaTorch.from_config(c).load_released(source.tensors)
        out = model(torch.from_numpy(ids), torch.from_numpy(px))[0].numpy()
    del model
    gc.collect()
    return out[0]


def compare(ref: np.ndarray, ours: np.ndarray) -> dict:
    ref, ours = np.asarray(ref, np.float64), np.asarray(ours, np.float64)
    if ref.shape != ours.shape:
        raise ValueError(f"logits shapes differ: PyTorch {ref.shape}, ours {ours.shape}")
    d = np.abs(ours - ref)
    lp = ref - ref.max(-1, keepdims=True)
    lp -= np.log(np.exp(lp).sum(-1, keepdims=True))
    lq = ours - ours.max(-1, keepdims=True)
    lq -= np.log(np.exp(lq).sum(-1, keepdims=True))
    kl = (np.exp(lp) * (lp - lq)).sum(-1)
    return {"tokens": int(ref.shape[0]), "max_abs_err": float(d.max()), "rel_err": float(d.max() / np.abs(ref).max()),
            "kl_max": float(kl.max()), "kl_mean": float(kl.mean()),
            "argmax_agree": float((ref.argmax(-1) == ours.argmax(-1)).mean())}


def verify(source: Source, ckpt: str | Path, *, max_rel_err: float | None = None, max_kl: float | None = None,
           prompt_tokens: int = 300, tokenizer_dirs=(), log=print) -> dict:
    """Run both sides, compare, return the metrics with `ok` and the thresholds used."""
    import jax

    from infllava_jax.api import InfLlava
    dt = _lowest_precision(source.config)
    if dt == "float32":   # fp32 parity needs full-precision matmuls on every backend
        jax.config.update("jax_default_matmul_precision", "highest")
    rel_t, kl_t = THRESHOLDS[dt]
    rel_t = rel_t if max_rel_err is None else max_rel_err
    kl_t = kl_t if max_kl is None else max_kl
    ids, px = prompt_ids(source, prompt_tokens, tokenizer_dirs), pixels(source.config)
    log(f"verify: {ids.shape[1]} prompt tokens + {source.config.tokens_per_image} image tokens, "
        f"{ASTRONAUT.name}, {dt}; running PyTorch ({source.kind})")
    ref = torch_logits(source, ids, px)
    log("verify: running ours (from the written checkpoint)")
    model = InfLlava.from_pretrained(ckpt)
    ours = model(ids, px)[0]
    del model
    m = compare(ref, ours)
    m.update(dtype=dt, max_rel_err=rel_t, max_kl=kl_t,
             ok=bool(m["rel_err"] <= rel_t and m["kl_max"] <= kl_t and math.isfinite(m["rel_err"])))
    log(f"verify: max |ours - torch| = {m['max_abs_err']:.3e} (relative {m['rel_err']:.3e}, limit {rel_t:.0e}); "
        f"per-token KL max {m['kl_max']:.3e} (limit {kl_t:.0e}), mean {m['kl_mean']:.3e}; "
        f"argmax agreement {100 * m['argmax_agree']:.1f}% over {m['tokens']} positions -> "
        f"{'OK' if m['ok'] else 'FAILED'}")
    return m
