"""The lmms-eval adapter against a stand-in of lmms-eval's `Instance` (always), against lmms_eval
itself when it is installed, and the streaming chat against batched generation."""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from infllava_jax import chat
from infllava_jax.data.template import tokenize
from infllava_jax.data.tokenizer import EOT, build_tiny_tokenizer
from infllava_jax.evaluation import demo_fixtures, lmms_adapter, prompting
from infllava_jax.evaluation.runner import Request, pixel_size
from infllava_jax.llama import LlamaForCausalLM, init_cache
from infllava_jax.model import InfLlavaModel
from infllava_jax.pixels import preprocess


# An independent KV-cache path: prefill, then one token at a time (teacher forcing).
@functools.partial(jax.jit, static_argnums=(0, 1))
def _prefill(config, max_len: int, params, input_ids, pixel_values):
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


@dataclasses.dataclass
class Instance:
    """Stand-in for lmms_eval.api.instance.Instance (the fields the adapter reads)."""
    request_type: str
    arguments: tuple
    idx: int = 0

    @property
    def args(self):
        return self.arguments


@pytest.fixture(scope="module")
def adapter():
    model = demo_fixtures.tiny_model(seed=5, grid=3)
    tok = build_tiny_tokenizer(model.config.llm.vocab_size)
    ad = lmms_adapter.Adapter(ckpt=None, model=model, tok=tok, batch_size=2, mesh="data=1")
    rng = np.random.default_rng(0)
    docs = [{"image": Image.fromarray(rng.integers(0, 256, (40 + 10 * i, 50, 3)).astype(np.uint8)),
             "question": q} for i, q in enumerate(["What is it?", "Is there a cat?", "Count the dogs.", "Colour?"])]
    ad.task_dict = {"synth": {"test": docs}}
    return ad, docs


def _visual(doc):
    return [doc["image"]]


N_NEW = 6
Q = "What is it?"


class FakeGenerator:
    """Records what the adapter asks for; answers with the request's position in its batch."""

    def __init__(self, batch_size):
        self.batch_size, self.calls = batch_size, []

    def generate(self, config, reqs, *, max_new_tokens, sampling=None, **_):
        self.calls.append((len(reqs), max_new_tokens, sampling.temperature, [r.ids for r in reqs], [len(r.images) for r in reqs]))
        return [np.asarray([97 + len(self.calls), 97 + j]) for j in range(len(reqs))]


def test_adapter_grouping_order_and_image_tokens(adapter, monkeypatch):
    ad, docs = adapter
    fake = FakeGenerator(batch_size=2)
    monkeypatch.setattr(ad, "gen", fake)
    two = lambda doc: [doc["image"], [doc["image"]]]       # nested lists are flattened
    reqs = [Instance("generate_until", (docs[0]["question"], {"max_new_tokens": 3}, _visual, 0, "synth", "test")),
            Instance("generate_until", ("<image>\nAlready tokenised", {"max_new_tokens": 4}, _visual, 1, "synth", "test")),
            Instance("generate_until", (docs[2]["question"], {"max_new_tokens": 3}, two, 2, "synth", "test")),
            Instance("generate_until", (docs[3]["question"], {"max_new_tokens": 3, "temperature": 0.5}, _visual, 3, "synth", "test")),
            Instance("generate_until", (docs[1]["question"], {"max_new_tokens": 3}, _visual, 1, "synth", "test"))]
    out = ad.generate_until(reqs)
    # groups: (3 greedy) -> requests 0, 2, 4 in batches of 2; (4 greedy) -> 1; (3, T=0.5) -> 3
    assert [(c[0], c[1], c[2]) for c in fake.calls] == [(2, 3, 0.0), (1, 3, 0.0), (1, 4, 0.0), (1, 3, 0.5)]
    dec = lambda call, j: ad.tok.decode([97 + call, 97 + j], skip_special_tokens=True).strip()
    assert out == [dec(1, 0), dec(3, 0), dec(1, 1), dec(4, 0), dec(2, 0)]
    ids0 = fake.calls[0][3][0]
    assert list(ids0) == list(prompting.encode(ad.tok, docs[0]["question"], 1, double_bos=True))
    assert fake.calls[0][4] == [1, 2] and list(fake.calls[0][3][1]).count(-200) == 2
    assert list(fake.calls[2][3][0]).count(-200) == 1      # "<image>" already in the context
    assert list(fake.calls[2][3][0]) == list(prompting.encode(ad.tok, "Already tokenised", 1, double_bos=True))


def test_generate_until_matches_sweep_generation(adapter):
    ad, docs = adapter
    reqs = [Instance("generate_until", (Q, {"max_new_tokens": N_NEW}, _visual, i, "synth", "test")) for i in range(3)]
    out = ad.generate_until(reqs)
    assert len(out) == 3 and all(isinstance(o, str) for o in out)
    for i in range(3):
        img = preprocess(docs[i]["image"], pixel_size(ad.config, "released"))
        ids = prompting.encode(ad.tok, Q, 1, double_bos=True)
        want = ad.gen.generate(ad.config, [Request(ids, [img])], max_new_tokens=N_NEW)[0]
        assert out[i] == prompting.decode(ad.tok, want)


def _teacher_forced(ad, doc, targets):
    """Sum of log p(target) and greedy-ness through the KV-cache path above (independent code)."""
    ctx = ad._encode("<image>\n" + Q)
    img = preprocess(doc["image"], pixel_size(ad.config, "released"))
    max_len = len(ctx) + ad.config.tokens_per_image - 1 + N_NEW
    logits, cache = _prefill(ad.config, max_len, ad.model.params, jnp.asarray(ctx[None]), jnp.asarray(img[None]))
    total, greedy = 0.0, True
    for t in targets:
        lg = np.asarray(logits[0], np.float64)
        total += lg[t] - np.logaddexp.reduce(lg)
        greedy &= int(np.argmax(lg)) == t
        logits, cache = _step(ad.config.llm, ad.model.params["language_model"], jnp.asarray([t], jnp.int32), cache)
    return total, greedy


def test_loglikelihood_matches_teacher_forced_cache(adapter):
    ad, docs = adapter
    conts = ["yes", "A cat"]
    got = ad.loglikelihood([Instance("loglikelihood", (Q, c, _visual, 0, "synth", "test")) for c in conts])
    assert got[0][0] != got[1][0]
    for (ll, greedy), c in zip(got, conts):
        targets = tokenize(f"{c}{EOT}", ad.tok)
        assert len(targets) <= N_NEW
        want, want_greedy = _teacher_forced(ad, docs[0], targets)
        assert ll == pytest.approx(want, rel=1e-4, abs=1e-4) and ll < 0
        assert greedy == want_greedy
    # the model's own greedy answer is greedy by construction
    img = preprocess(docs[0]["image"], pixel_size(ad.config, "released"))
    toks = ad.gen.generate(ad.config, [Request(prompting.encode(ad.tok, Q, 1, double_bos=True), [img])],
                           max_new_tokens=N_NEW)[0]
    eot = ad.tok.convert_tokens_to_ids(EOT)
    if toks[-1] == eot:  # only then is "answer + <|eot_id|>" a greedy continuation
        text = ad.tok.decode(toks[:-1], skip_special_tokens=True)
        if tokenize(text, ad.tok) == list(toks[:-1]):
            ll, greedy = ad.loglikelihood([Instance("loglikelihood", (Q, text, _visual, 0, "synth", "test"))])[0]
            assert greedy


def test_chat_stream_equals_greedy_generation(adapter):
    ad, docs = adapter
    streamed = "".join(chat.stream(ad.model, ad.tok, docs[0]["image"], Q, max_new_tokens=N_NEW))
    img = preprocess(docs[0]["image"], pixel_size(ad.config, "released"))
    toks = ad.gen.generate(ad.config, [Request(prompting.encode(ad.tok, Q, 1, double_bos=True), [img])],
                           max_new_tokens=N_NEW)[0]
    assert streamed.strip() == prompting.decode(ad.tok, toks)


def test_with_real_lmms_eval(adapter):
    lmms_eval = pytest.importorskip("lmms_eval.api.model")
    assert issubclass(lmms_adapter.InfLlavaJax, lmms_eval.lmms)
    try:
        m = lmms_adapter.manifest()
    except ImportError:
        pytest.skip("lmms_eval without the entry-point registry (0.2.x): LMMS_EVAL_PLUGINS path")
    assert m.model_id == "infllava_jax" and m.simple_class_path == lmms_adapter.CLASS_PATH
