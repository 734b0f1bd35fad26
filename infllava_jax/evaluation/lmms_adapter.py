"""An lmms-eval model adapter: `lmms-eval --model infllava_jax --model_args ckpt=DIR,...`.

Behaves like lmms-eval's `llava` adapter (July 2024): "<image>" tokens (one per visual, joined
by spaces) + "\\n" before the context unless it already has one, the checkpoint's template (conversation.py),
greedy unless the task asks for temperature > 0, outputs decoded with special tokens skipped
(lmms-eval strips them before scoring). Requests are grouped by generation kwargs and batched
through `runner.Generator` (bucketed, jitted, data-parallel).

`loglikelihood` (multiple_choice tasks and the *_ppl variants), as lmms-eval's llava returns it:
the loss, i.e. the mean negative log-probability per continuation token given the context
(template with the continuation as the assistant answer, its end token included; the context
ids are the prompt up to the open assistant header), and whether it is the greedy continuation.
Lower is better: lmms-eval's multiple_choice picks the choice with the smallest value.

Registration (docs/evaluation-lmms.md): the entry point group "lmms_eval.models" with the payload
`infllava_jax.evaluation.lmms_adapter:manifest`, declared by the small distribution in
`infllava_jax/evaluation/lmms_plugin/` (`pip install --no-deps -e infllava_jax/evaluation/lmms_plugin`,
with this repository importable), or the legacy `LMMS_EVAL_PLUGINS=infllava_jax.evaluation.lmms_plugin`
(that package's `models` and `tasks`).

The adapter logic (`Adapter`) does not import lmms_eval; `InfLlavaJax` (the class lmms-eval
loads) exists only when lmms_eval is importable.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

MODEL_NAME = "infllava_jax"
CLASS_PATH = "infllava_jax.evaluation.lmms_adapter.InfLlavaJax"
DEFAULT_IMAGE_TOKEN = "<image>"


def _batch_size(v) -> int:
    """lmms-eval's --batch_size (a string; "auto"/"auto:N" have no meaning here: 8)."""
    return int(v) if str(v).isdigit() and int(v) > 0 else 8


class Adapter:
    """lmms-eval's simple-model interface on top of `runner.Generator` (no lmms_eval import)."""

    def __init__(self, ckpt: str, res: int = 0, batch_size: int = 8, tokenizer: str = "",
                 pixels: str = "", image_mode: str = "", double_bos="", template: str = "", mesh: str = "",
                 max_new_tokens: int = 1024, quant: str = "", model=None, tok=None, **kwargs: Any) -> None:
        from infllava_jax.api import InfLlava
        from infllava_jax.conversation import stop_ids
        from infllava_jax.evaluation import prompting
        from infllava_jax.evaluation.runner import Generator, grid_config
        from infllava_jax.sharding import make_mesh

        self._lmms_init()
        self.mesh = make_mesh(mesh or "data=-1")
        if model is None:
            model = InfLlava.from_pretrained(ckpt, mesh=self.mesh, quant=quant or None)   # "int8" | "int4"
        else:  # an in-memory model: its parameters replicated over this (data-parallel) mesh
            import jax
            from jax.sharding import NamedSharding, PartitionSpec
            model = InfLlava(model.config, jax.device_put(model.params, NamedSharding(self.mesh, PartitionSpec())),
                             usage=model.usage)
        self.model = model
        # "" = what the checkpoint recorded (usage.json: template, pixels, image mode, doubled BOS)
        self.usage = model.usage.override(template=template, pixels=pixels, image_mode=image_mode,
                                          double_bos=double_bos)
        self.config = grid_config(self.model.config, int(res)) if int(res) else self.model.config
        self.tok = tok or prompting.get_tokenizer(tokenizer, ckpt, self.config.llm.vocab_size, self.usage)
        pad = self.config.pad_token_id if self.config.pad_token_id is not None else self.tok.pad_token_id
        self.gen = Generator(self.model.params, self.mesh, batch_size=_batch_size(batch_size), pad_id=pad or 0,
                             stop_ids=stop_ids(self.usage, self.tok))
        self.pixels, self.image_mode, self.double_bos = self.usage.pixels, self.usage.image_mode, self.usage.double_bos
        self.default_max_new_tokens = int(max_new_tokens)
        self.ignored_kwargs = kwargs
        self.task_dict = getattr(self, "task_dict", {})

    def _lmms_init(self):  # the lmms base class's __init__ when mixed in
        init = getattr(super(), "__init__", None)
        try:
            init()
        except TypeError:
            pass

    @property
    def batch_size(self) -> int:
        return self.gen.batch_size

    # -- helpers --------------------------------------------------------------------------------
    def _visuals(self, doc_to_visual, doc_id, task, split) -> list:
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual else []
        flat = []
        for v in visuals or []:
            flat.extend(v if isinstance(v, (list, tuple)) else [v])
        return flat

    def _question(self, context: str, n_images: int) -> tuple[str, int]:
        """lmms-eval llava: prepend the image tokens unless the context already has them."""
        if n_images and DEFAULT_IMAGE_TOKEN not in context:
            return " ".join([DEFAULT_IMAGE_TOKEN] * n_images) + "\n" + context, n_images
        return context, context.count(DEFAULT_IMAGE_TOKEN)

    def _encode(self, question: str) -> np.ndarray:
        from infllava_jax.conversation import encode_prompt
        return encode_prompt(self.tok, question, 0, self.usage)   # the checkpoint's template

    def _images(self, visuals) -> list:
        from infllava_jax.evaluation.runner import pixel_size
        from infllava_jax.pixels import preprocess
        size = pixel_size(self.config, self.pixels)
        return [preprocess(v.convert("RGB") if hasattr(v, "convert") else v, size, self.image_mode)
                for v in visuals]

    # -- lmms-eval interface --------------------------------------------------------------------
    def generate_until(self, requests: Sequence) -> list[str]:
        from infllava_jax.evaluation import prompting
        from infllava_jax.evaluation.runner import Request, Sampling
        out: list[str | None] = [None] * len(requests)
        groups: dict = {}
        for i, req in enumerate(requests):
            context, gen_kwargs, doc_to_visual, doc_id, task, split = req.args[:6]
            kw = dict(gen_kwargs or {})
            key = (int(kw.get("max_new_tokens", self.default_max_new_tokens)), float(kw.get("temperature", 0) or 0),
                   float(kw.get("top_p", 1.0) or 1.0))
            groups.setdefault(key, []).append((i, context, doc_to_visual, doc_id, task, split))
        for (n_new, temp, top_p), items in groups.items():
            for start in range(0, len(items), self.batch_size):
                chunk = items[start:start + self.batch_size]
                reqs = []
                for _, context, doc_to_visual, doc_id, task, split in chunk:
                    visuals = self._visuals(doc_to_visual, doc_id, task, split)
                    question, _ = self._question(context, len(visuals))
                    reqs.append(Request(self._encode(question), self._images(visuals)))
                toks = self.gen.generate(self.config, reqs, max_new_tokens=n_new,
                                         sampling=Sampling(temp, top_p, 0))
                for (i, *_), t in zip(chunk, toks):
                    out[i] = prompting.decode(self.tok, t)
        return out  # type: ignore[return-value]

    def loglikelihood(self, requests: Sequence) -> list[tuple[float, bool]]:
        from infllava_jax.data.template import tokenize
        from infllava_jax.conversation import answer_end
        from infllava_jax.evaluation.runner import bucket
        res = []
        for req in requests:
            context, doc_to_target, doc_to_visual, doc_id, task, split = req.args[:6]
            cont = doc_to_target if isinstance(doc_to_target, str) else doc_to_target(self.task_dict[task][split][doc_id])
            visuals = self._visuals(doc_to_visual, doc_id, task, split)
            question, n_img = self._question(context, len(visuals))
            ctx = self._encode(question)
            # the answer turn as the template renders it: continuation + <|eot_id|> (llama3) or </s>
            targets = np.asarray(tokenize(f"{cont}{answer_end(self.usage.template)}", self.tok), np.int32)
            full = np.concatenate([ctx, targets])
            # right-padded to a length bucket (causal: earlier logits unchanged), one program per bucket
            L = bucket(len(full), self.gen.length_buckets)
            ids = np.full((1, L), self.gen.pad_id, np.int32)
            ids[0, :len(full)] = full
            mask = (np.arange(L) < len(full))[None].astype(np.int32)
            imgs = self._images(visuals) or [np.zeros((self.config.sub_image_size,) * 2 + (3,), np.float32)]
            pix = np.moveaxis(np.stack(imgs), -1, -3)[None]          # (1, K, 3, S, S)
            logits = self.model(ids, pix if len(imgs) > 1 else pix[:, 0], mask)[0]
            n_ctx = len(ctx) + n_img * (self.config.tokens_per_image - 1)  # after splicing
            pred = logits[n_ctx - 1:n_ctx - 1 + len(targets)].astype(np.float64)
            logp = pred - np.logaddexp.reduce(pred, axis=-1, keepdims=True)
            # lmms-eval's llava returns the loss (mean -log p per continuation token) and its
            # multiple_choice picks np.argmin: lower is better, as here
            loss = -float(np.mean(logp[np.arange(len(targets)), targets]))
            res.append((loss, bool(np.all(np.argmax(pred, -1) == targets))))
        return res

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("multi-round generation is not supported by infllava_jax")


def manifest():
    """Entry-point payload for lmms-eval's `lmms_eval.models` group."""
    from lmms_eval.models.registry_v2 import ModelManifest
    return ModelManifest(model_id=MODEL_NAME, simple_class_path=CLASS_PATH)


try:  # the class lmms-eval instantiates; only where lmms_eval is installed
    from lmms_eval.api.model import lmms as _lmms
except Exception:  # noqa: BLE001  (not installed, or its heavy imports fail)
    _lmms = None

if _lmms is not None:
    class InfLlavaJax(Adapter, _lmms):
        """lmms-eval model `infllava_jax` (model_args: ckpt, res, batch_size, tokenizer, pixels, ...)."""
        is_simple = True

        def loglikelihood(self, requests):
            return [_survives_unwrap(r) for r in Adapter.loglikelihood(self, requests)]

    def _survives_unwrap(result):
        """lmms-eval 0.7.x passes every response through `api.instance.unwrap_generation_output`,
        which turns a (loss, is_greedy) tuple into its str() and breaks multiple_choice
        (`lls, is_greedy = zip(*results)`); a GenerationResult's `text` is passed on as it is."""
        try:
            from lmms_eval.api.instance import GenerationResult, unwrap_generation_output
        except ImportError:  # lmms-eval before 0.7: tuples pass unchanged
            return result
        return result if unwrap_generation_output(result)[0] == result else GenerationResult(text=result)

    try:  # lmms-eval 2024 registry (the entry point / manifest covers newer versions)
        from lmms_eval.api.registry import register_model
        register_model(MODEL_NAME)(InfLlavaJax)
    except Exception:  # noqa: BLE001
        pass
