"""The lmms-eval adapter against a stand-in of lmms-eval's `Instance` (always), against lmms_eval
itself when it is installed, and the streaming chat against batched generation."""
import dataclasses
import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from infllava_jax import chat
from infllava_jax.conversation import answer_end
from infllava_jax.data.template import tokenize
from infllava_jax.data.tokenizer import EOT, build_tiny_tokenizer
from infllava_jax.evaluation import demo_fixtures, lmms_adapter, prompting, scorers
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


def _teacher_forced(config, params, ctx, img, targets):
    """Per-token log p(target) and greedy-ness through the KV-cache path above (independent code)."""
    max_len = len(ctx) + config.tokens_per_image - 1 + len(targets)
    logits, cache = _prefill(config, max_len, params, jnp.asarray(ctx[None]), jnp.asarray(img[None]))
    logps, greedy = [], True
    for t in targets:
        lg = np.asarray(logits[0], np.float64)
        logps.append(lg[t] - np.logaddexp.reduce(lg))
        greedy &= int(np.argmax(lg)) == t
        logits, cache = _step(config.llm, params["language_model"], jnp.asarray([t], jnp.int32), cache)
    return np.asarray(logps), greedy


def _doc_teacher_forced(ad, doc, targets):
    img = preprocess(doc["image"], pixel_size(ad.config, "released"))
    return _teacher_forced(ad.config, ad.model.params, ad._encode("<image>\n" + Q), img, targets)


def test_loglikelihood_matches_teacher_forced_cache(adapter):
    ad, docs = adapter
    conts = ["yes", "A cat"]
    got = ad.loglikelihood([Instance("loglikelihood", (Q, c, _visual, 0, "synth", "test")) for c in conts])
    assert got[0][0] != got[1][0]
    for (loss, greedy), c in zip(got, conts):
        targets = tokenize(f"{c}{EOT}", ad.tok)
        assert len(targets) <= N_NEW
        logps, want_greedy = _doc_teacher_forced(ad, docs[0], targets)
        # lmms-eval's llava convention: the loss, mean -log p per continuation token (> 0)
        assert loss == pytest.approx(-logps.mean(), rel=1e-4, abs=1e-4) and loss > 0
        assert greedy == want_greedy
    # the model's own greedy answer is greedy by construction
    img = preprocess(docs[0]["image"], pixel_size(ad.config, "released"))
    toks = ad.gen.generate(ad.config, [Request(prompting.encode(ad.tok, Q, 1, double_bos=True), [img])],
                           max_new_tokens=N_NEW)[0]
    eot = ad.tok.convert_tokens_to_ids(EOT)
    if toks[-1] == eot:  # only then is "answer + <|eot_id|>" a greedy continuation
        text = ad.tok.decode(toks[:-1], skip_special_tokens=True)
        if tokenize(text, ad.tok) == list(toks[:-1]):
            loss, greedy = ad.loglikelihood([Instance("loglikelihood", (Q, text, _visual, 0, "synth", "test"))])[0]
            assert greedy


def lmms_eval_choice(results) -> int:
    """lmms-eval's multiple_choice selection (lmms_eval/api/task.py, process_results, 0.7.3):
    `lls, is_greedy = zip(*results); pred = np.argmin(lls)`."""
    lls, _ = zip(*results)
    return int(np.argmin(lls))


@pytest.mark.parametrize("doc_id", [0, 1, 2])
def test_two_choice_request_picks_the_more_probable_continuation(adapter, doc_id):
    """A two-choice multiple_choice request as lmms-eval builds it (continuations " " + choice):
    its selection rule on our values picks the choice with the higher mean log-probability."""
    ad, docs = adapter
    choices = [" yes", " no"]
    got = ad.loglikelihood([Instance("loglikelihood", (Q, c, _visual, doc_id, "synth", "test"), idx=i)
                            for i, c in enumerate(choices)])
    mean_logp = [_doc_teacher_forced(ad, docs[doc_id], tokenize(f"{c}{EOT}", ad.tok))[0].mean() for c in choices]
    assert abs(mean_logp[0] - mean_logp[1]) > 1e-3       # a real preference to recover
    assert lmms_eval_choice(got) == int(np.argmax(mean_logp))
    # and the reverse order of the same choices picks the same continuation
    rev = ad.loglikelihood([Instance("loglikelihood", (Q, c, _visual, doc_id, "synth", "test"))
                            for c in choices[::-1]])
    assert choices[::-1][lmms_eval_choice(rev)] == choices[lmms_eval_choice(got)]


def test_chat_stream_equals_greedy_generation(adapter):
    ad, docs = adapter
    streamed = "".join(chat.stream(ad.model, ad.tok, docs[0]["image"], Q, max_new_tokens=N_NEW))
    img = preprocess(docs[0]["image"], pixel_size(ad.config, "released"))
    toks = ad.gen.generate(ad.config, [Request(prompting.encode(ad.tok, Q, 1, double_bos=True), [img])],
                           max_new_tokens=N_NEW)[0]
    assert streamed.strip() == prompting.decode(ad.tok, toks)


@pytest.mark.slow   # only with lmms-eval installed
def test_with_real_lmms_eval(adapter):
    lmms_eval = pytest.importorskip("lmms_eval.api.model")
    assert issubclass(lmms_adapter.InfLlavaJax, lmms_eval.lmms)
    try:
        m = lmms_adapter.manifest()
    except ImportError:
        pytest.skip("lmms_eval without the entry-point registry (0.2.x): LMMS_EVAL_PLUGINS path")
    assert m.model_id == "infllava_jax" and m.simple_class_path == lmms_adapter.CLASS_PATH


# ------------------------------------------------------------------ lmms-eval's own CLI, offline
REPO = Path(__file__).resolve().parents[1]
GEN_QUESTIONS = ["What is it?", "Is there a cat?", "Count the dogs.", "Colour?"]
MC_CHOICES = ["yes", "no"]
MAX_NEW = 5

TASK_UTILS = '''from PIL import Image


def doc_to_visual(doc):
    return [Image.open(doc["image"]).convert("RGB")]


def gen_results(doc, results):
    return {"exact_match": float(results[0].strip() == doc["answer"])}
'''


def _task_yaml(name, data, output_type, extra):
    return (f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
            f"test_split: test\noutput_type: {output_type}\ndoc_to_visual: !function utils.doc_to_visual\n"
            f"doc_to_text: question\ndoc_to_target: answer\n{extra}")


GEN_EXTRA = (f"generation_kwargs:\n  max_new_tokens: {MAX_NEW}\n  temperature: 0\n  do_sample: false\n"
             "process_results: !function utils.gen_results\n"
             "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n")
MC_EXTRA = f"doc_to_choice: {MC_CHOICES}\nmetric_list:\n  - metric: acc\n"


def _our_answers(model, images):
    """eval.py's path: the checkpoint's usage, prompting.encode, runner.Generator, prompting.decode."""
    from infllava_jax.evaluation.runner import Generator
    from infllava_jax.sharding import make_mesh
    gen = Generator(model.params, make_mesh("data=1"), batch_size=2, pad_id=0, stop_ids=model.stop_ids)
    u, tok = model.usage, model.tokenizer
    reqs = [Request(prompting.encode(tok, q, 1, usage=u), [preprocess(im, pixel_size(model.config, u.pixels), u.image_mode)])
            for q, im in zip(GEN_QUESTIONS, images)]
    toks = [t for i in range(0, len(reqs), 2) for t in gen.generate(model.config, reqs[i:i + 2], max_new_tokens=MAX_NEW)]
    return [prompting.decode(tok, t) for t in toks]


def _our_mean_logps(model, image, question):
    """Mean log p per token of each choice (teacher-forced KV-cache path), continuations as
    lmms-eval builds them (target_delimiter " " + choice) followed by the template's end token."""
    u, tok = model.usage, model.tokenizer
    ctx = prompting.encode(tok, question, 1, usage=u)
    img = preprocess(image, pixel_size(model.config, u.pixels), u.image_mode)
    means = [_teacher_forced(model.config, model.params, ctx, img, tokenize(f" {c}{answer_end(u.template)}", tok))[0].mean()
             for c in MC_CHOICES]
    assert abs(means[0] - means[1]) > 1e-3
    return means


def _samples(out, task):
    files = sorted(out.rglob(f"*_samples_{task}.jsonl"))
    assert len(files) == 1, files
    return {s["doc_id"]: s for s in map(json.loads, files[0].read_text().splitlines())}


def _lmms_eval(tmp_path, task, env, out):
    """lmms-eval's console script as a user types it; its results and logged samples."""
    cmd = [str(Path(sys.executable).parent / "lmms-eval"), "--model", "infllava_jax",
           "--model_args", f"ckpt={tmp_path / 'ckpt'}", "--tasks", task, "--include_path", str(tmp_path / "tasks"),
           "--batch_size", "2", "--output_path", str(out), "--log_samples"]
    env = {**env, "HF_HOME": str(tmp_path / "hf"), "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
           "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}        # one CPU device, as on a user's machine
    r = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    # lmms-eval 0.7.3 exits 0 after an error inside the evaluation: the results file decides
    results = list(out.rglob("*results.json"))
    assert r.returncode == 0 and len(results) == 1, r.stdout[-3000:] + r.stderr[-3000:]
    return json.loads(results[0].read_text())["results"][task], _samples(out, task)


def _entry_point_site(tmp_path) -> Path:
    """What `pip install --no-deps -e infllava_jax/evaluation/lmms_plugin` makes visible to
    importlib.metadata: a dist-info with the entry points of lmms_plugin/pyproject.toml."""
    import tomllib
    project = tomllib.loads((REPO / "infllava_jax/evaluation/lmms_plugin/pyproject.toml").read_text())["project"]
    info = tmp_path / "site" / f"{project['name'].replace('-', '_')}-{project['version']}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: {project['version']}\n")
    eps = "".join(f"[{group}]\n" + "".join(f"{k} = {v}\n" for k, v in table.items())
                  for group, table in project["entry-points"].items())
    (info / "entry_points.txt").write_text(eps)
    return info.parent


@pytest.mark.slow
def test_lmms_eval_cli_on_local_tasks_agrees_with_our_scoring(tmp_path):
    """`lmms-eval --model infllava_jax` on a generation task (through LMMS_EVAL_PLUGINS, the
    legacy route) and a two-choice task (through the entry point), both written here (local
    json + images, no network): its per-question answers are eval.py's, its choices are the
    more probable continuations."""
    pytest.importorskip("lmms_eval.api.task")
    from infllava_jax.api import InfLlava
    demo_fixtures.make_tiny_checkpoint(tmp_path / "ckpt", seed=5)
    model = InfLlava.from_pretrained(tmp_path / "ckpt")
    rng = np.random.default_rng(1)
    paths = []
    for i in range(len(GEN_QUESTIONS)):
        paths.append(tmp_path / f"img{i}.png")
        Image.fromarray(rng.integers(0, 256, (40 + 10 * i, 50, 3)).astype(np.uint8)).save(paths[-1])
    images = [Image.open(p).convert("RGB") for p in paths]
    ours = _our_answers(model, images)
    # gold = our answer on even questions, something else on odd ones: expected score 0.5
    gen_docs = [dict(question=q, image=str(p), answer=a if i % 2 == 0 else "zz-not-it")
                for i, (q, p, a) in enumerate(zip(GEN_QUESTIONS, paths, ours))]
    means = [_our_mean_logps(model, im, "Is there a cat?") for im in images]
    best = [int(np.argmax(m)) for m in means]
    mc_docs = [dict(question="Is there a cat?", image=str(p), answer=MC_CHOICES[b if i % 2 == 0 else 1 - b])
               for i, (p, b) in enumerate(zip(paths, best))]
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "utils.py").write_text(TASK_UTILS)
    for name, docs, otype, extra in (("infl_local_gen", gen_docs, "generate_until", GEN_EXTRA),
                                     ("infl_local_mc", mc_docs, "multiple_choice", MC_EXTRA)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
        (tmp_path / "tasks" / f"{name}.yaml").write_text(_task_yaml(name, tmp_path / f"{name}.jsonl", otype, extra))
    base = {k: v for k, v in os.environ.items() if k != "LMMS_EVAL_PLUGINS"}

    legacy = {**base, "PYTHONPATH": str(REPO), "LMMS_EVAL_PLUGINS": "infllava_jax.evaluation.lmms_plugin"}
    results, gen = _lmms_eval(tmp_path, "infl_local_gen", legacy, tmp_path / "out_gen")
    assert sorted(gen) == list(range(len(GEN_QUESTIONS)))
    for i, a in enumerate(ours):
        assert gen[i]["filtered_resps"] == a
        assert gen[i]["exact_match"] == float(scorers.exact_match(a, gen_docs[i]["answer"]))
    assert results["exact_match,none"] == 0.5

    entry_point = {**base, "PYTHONPATH": os.pathsep.join([str(REPO), str(_entry_point_site(tmp_path))])}
    results, mc = _lmms_eval(tmp_path, "infl_local_mc", entry_point, tmp_path / "out_mc")
    assert [mc[i]["acc"] for i in range(len(paths))] == [1.0, 0.0, 1.0, 0.0]
    for i, m in enumerate(means):   # the logged values: lmms-eval's llava convention, the loss
        losses = [float(loss) for loss, _ in mc[i]["filtered_resps"]]
        assert losses == pytest.approx([-x for x in m], rel=1e-4, abs=1e-4)
    assert results["acc,none"] == 0.5
