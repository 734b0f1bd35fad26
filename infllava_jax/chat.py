"""Ask a checkpoint about an image, streaming the answer token by token.

    python -m infllava_jax.chat --ckpt DIR --image PATH "What is in the image?"

The prompt, stop ids and image preparation are the checkpoint's (usage.json, conversation.py:
`llama3` for INF-LLaVA, `vicuna_v1` for LLaVA-1.5), "<image>\\n" + question as the benchmarks
use it; --template / --pixels override them. The model's one generation program
(`generate.generate`: greedy, or temperature + top-p) hands each token to the host as it is
picked, and the text is printed as soon as it decodes to whole characters.
"""
from __future__ import annotations

import argparse
import queue
import sys
import threading
from typing import Iterator

import jax
import jax.numpy as jnp

from infllava_jax import conversation
from infllava_jax.api import InfLlava
from infllava_jax.config import InfLlavaConfig
from infllava_jax.generate import generate
from infllava_jax.token_ids import check_row


class _Sink:
    """The host end of the program's `on_token` callback: one object (so the program compiles
    once), pointed at the queue of the current stream."""
    queue: queue.Queue | None = None

    def __call__(self, step, tokens) -> None:
        self.queue.put(int(tokens[0]))


_SINK = _Sink()


def stream(model: InfLlava, tokenizer, image, question: str, *, config: InfLlavaConfig | None = None,
           max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
           pixels: str | None = None, double_bos: bool | None = None, template: str | None = None) -> Iterator[str]:
    """Yield pieces of the answer text as they are generated. pixels / double_bos / template:
    None = the model's usage (as its checkpoint recorded)."""
    from infllava_jax.inputs import encode_row, image_size
    from infllava_jax.pixels import preprocess

    config = config or model.config
    usage = model.usage.override(pixels=pixels, double_bos=double_bos, template=template)
    img = preprocess(image, image_size(config, usage.pixels), usage.image_mode)
    ids = encode_row(tokenizer, usage, question, 1)
    ids = check_row(ids, None, config, 1, "of the prompt")[0]   # a tokenizer larger than the model: an error
    ids = jnp.asarray(ids[None], jnp.int32)
    stops, out, shown, failed = conversation.stop_ids(usage, tokenizer), [], "", []
    _SINK.queue = tokens = queue.Queue()

    def run():
        try:
            generate(config, model.params, ids, jnp.asarray(img[None]), jnp.ones_like(ids), jnp.asarray(stops),
                     jax.random.key(seed), jnp.float32(temperature or 1.0), jnp.float32(top_p),
                     max_new_tokens=max_new_tokens, do_sample=temperature > 0,
                     pad_id=config.pad_token_id or 0, on_token=_SINK)
        except BaseException as e:   # re-raised in the consumer
            failed.append(e)
        tokens.put(None)

    worker = threading.Thread(target=run, name="infllava-chat", daemon=True)
    worker.start()
    try:
        while (tok := tokens.get()) is not None and tok not in stops:
            out.append(tok)
            text = tokenizer.decode(out, skip_special_tokens=True)
            if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
                yield text[len(shown):]
                shown = text
    finally:   # the program may still run past a stop id: a thread left inside XLA aborts the exit
        worker.join()
    if failed:
        raise failed[0]
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
    p.add_argument("--template", default="", choices=("",) + conversation.TEMPLATES,
                   help='"" = the checkpoint\'s (llama3 for INF-LLaVA, vicuna_v1 for LLaVA-1.5)')
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pixels", default="", choices=("",) + conversation.PIXELS, help='"" = the checkpoint\'s')
    p.add_argument("--quant", default="", help='"" = as saved; "int8" | "int4": weight-only quantized language model')
    a = p.parse_args(argv)
    from infllava_jax.errors import InputError, one_line
    from infllava_jax.evaluation.datasets import open_image
    try:
        image = open_image(a.image, where=a.image)   # capped before decoding, any mode -> RGB
        model = InfLlava.from_pretrained(a.ckpt, tokenizer=a.tokenizer or None, quant=a.quant or None)
        model.usage = model.usage.override(template=a.template, pixels=a.pixels)
        _answer(model, image, a)
    except InputError as e:
        print(f"chat: error: {one_line(e, 1000)}", file=sys.stderr)
        return 2
    return 0


def _answer(model: InfLlava, image, a) -> None:
    from infllava_jax.evaluation.runner import grid_config
    config = grid_config(model.config, a.res) if a.res else model.config
    for piece in stream(model, model.tokenizer, image, a.question, config=config, max_new_tokens=a.max_new_tokens,
                        temperature=a.temperature, top_p=a.top_p, seed=a.seed):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")


if __name__ == "__main__":
    sys.exit(main())
