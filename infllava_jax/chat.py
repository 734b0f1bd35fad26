"""Ask a checkpoint about an image, streaming the answer token by token.

    python -m infllava_jax.chat --ckpt DIR --image PATH "What is in the image?"

The prompt is the `llama3` template with "<image>\\n" + question (as the benchmarks use it);
one jitted prefill (image encoding + prompt into the KV cache), then one jitted single-token
step per new token, the next token picked on the host (greedy, or temperature + top-p) and the
text printed as soon as it decodes to whole characters.
"""
from __future__ import annotations

import argparse
import functools
import sys
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np

from infllava_jax.api import InfLlava
from infllava_jax.config import InfLlavaConfig
from infllava_jax.llama import LlamaForCausalLM, init_cache
from infllava_jax.model import InfLlavaModel


@functools.partial(jax.jit, static_argnums=(0, 1))
def _prefill(config: InfLlavaConfig, max_len: int, params, input_ids, pixel_values):
    x = InfLlavaModel(config).apply({"params": params}, input_ids, pixel_values,
                                    method=InfLlavaModel.embed_inputs)
    lm, v = LlamaForCausalLM(config.llm), {"params": params["language_model"]}
    cache = init_cache(config.llm, input_ids.shape[0], max_len)
    hidden, cache = lm.apply(v, inputs_embeds=x["inputs_embeds"], attention_mask=x["attention_mask"],
                             cache=cache, return_hidden=True)
    return lm.apply(v, hidden[:, -1:], method=LlamaForCausalLM.logits)[:, 0], cache


@functools.partial(jax.jit, static_argnums=0, donate_argnums=3)
def _step(llm_config, params, token, cache):
    logits, cache = LlamaForCausalLM(llm_config).apply(
        {"params": params}, token[:, None], attention_mask=jnp.ones((token.shape[0], 1), bool), cache=cache)
    return logits[:, 0], cache


def _pick(logits: np.ndarray, rng: np.random.Generator, temperature: float, top_p: float) -> int:
    if temperature <= 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    order = np.argsort(-p)
    keep = order[: max(1, int(np.sum(np.cumsum(p[order]) - p[order] < top_p)))]
    return int(rng.choice(keep, p=p[keep] / p[keep].sum()))


def stream(model: InfLlava, tokenizer, image, question: str, *, config: InfLlavaConfig | None = None,
           max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
           pixels: str = "released", double_bos: bool = True) -> Iterator[str]:
    """Yield pieces of the answer text as they are generated."""
    from infllava_jax.data.tokenizer import stop_ids
    from infllava_jax.evaluation import prompting
    from infllava_jax.evaluation.runner import pixel_size
    from infllava_jax.pixels import preprocess

    config = config or model.config
    img = preprocess(image, pixel_size(config, pixels), "pad")
    ids = prompting.encode(tokenizer, question, 1, double_bos=double_bos)
    L = len(ids) + config.tokens_per_image - 1
    logits, cache = _prefill(config, L + max_new_tokens, model.params, jnp.asarray(ids[None]),
                             jnp.asarray(img[None]))
    stops, rng = set(stop_ids(tokenizer)), np.random.default_rng(seed)
    out: list[int] = []
    shown = ""
    llm_params = model.params["language_model"]
    for _ in range(max_new_tokens):
        tok = _pick(np.asarray(logits[0]), rng, temperature, top_p)
        if tok in stops:
            break
        out.append(tok)
        text = tokenizer.decode(out, skip_special_tokens=True)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            yield text[len(shown):]
            shown = text
        logits, cache = _step(config.llm, llm_params, jnp.asarray([tok], jnp.int32), cache)
    text = tokenizer.decode(out, skip_special_tokens=True)
    if text != shown:  # an incomplete character at the end: show what decoding gives
        yield text[len(shown):]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m infllava_jax.chat", description=__doc__.split("\n")[0])
    p.add_argument("question")
    p.add_argument("--ckpt", required=True)
    p.add_argument("--image", required=True)
    p.add_argument("--res", type=int, default=0, help="sweep resolution (grid n = res / 336); 0 = as saved")
    p.add_argument("--tokenizer", default="", help='"" = the checkpoint\'s, "tiny", or a directory')
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pixels", default="released", choices=("released", "native"))
    a = p.parse_args(argv)
    from PIL import Image

    from infllava_jax.evaluation import prompting
    from infllava_jax.evaluation.runner import grid_config
    model = InfLlava.from_pretrained(a.ckpt)
    tok = prompting.get_tokenizer(a.tokenizer, a.ckpt, model.config.llm.vocab_size)
    config = grid_config(model.config, a.res) if a.res else model.config
    with Image.open(a.image) as im:
        image = im.convert("RGB")
    for piece in stream(model, tok, image, a.question, config=config, max_new_tokens=a.max_new_tokens,
                        temperature=a.temperature, top_p=a.top_p, seed=a.seed, pixels=a.pixels):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
