"""Stage-1 probe of the miniature study: which facts of a synthetic scene a model names in its caption.

Teacher-forced, in the stage-1 format (plain template, square image): the true caption of every
test image (scenes_test.jsonl, `scenes.caption`) is fed after the image; a fact counts as named when the model's
argmax predicts every one of its tokens. Per fact the result is the share of test images, next to
the chance level (every answer is equally frequent; the box colour is in the context when the
circle colour is predicted, so that one is 1 of 4).
"""
from __future__ import annotations

from pathlib import Path

import jax
import numpy as np

from infllava_jax.study import scenes
from infllava_jax.data.images import load_resized, normalize
from infllava_jax.data.template import encode_conversation
from infllava_jax.model import InfLlavaModel
from infllava_jax.splice import IGNORE_INDEX

FACTS = ("box colour", "circle colour", "side", "digit", "count", "corner")
CHANCE = {"box colour": 1 / 5, "circle colour": 1 / 4, "side": 1 / 2, "digit": 1 / 6, "count": 1 / 5,
          "corner": 1 / 4}


def _fact_values(record: dict) -> dict:
    a, c = record["answers"], record["colors"]
    return {"box colour": c["box"], "digit": a["digit"], "circle colour": c["circle"], "count": a["count"],
            "side": a["side"], "corner": a["corner"]}


def _spans(text: str, values: dict, tokenizer) -> dict:
    """fact -> indices of the caption tokens that overlap the fact's value or the space before it
    (values in caption order). The space counts: a colour that BPE splits as " " + "re" + "d"
    would otherwise leak its family through the teacher-forced " "."""
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    out, pos = {}, 0
    for fact in ("box colour", "digit", "circle colour", "count", "side", "corner"):
        start = text.index(values[fact], pos)
        end = pos = start + len(values[fact])
        out[fact] = [k for k, (a, b) in enumerate(offsets) if a < end and b > start - 1]
    return out


def probe(config, params, tokenizer, data_dir, n: int, batch: int = 32) -> dict:
    """Share of the first n test images (of `data_dir`, written by scenes.generate) whose facts
    the model names right, per fact."""
    records = scenes.read_scenes(data_dir, "test")[:n]
    size, T = config.image_size[0], config.tokens_per_image
    fwd = jax.jit(lambda p, ids, px: InfLlavaModel(config).apply({"params": p}, ids, px))
    hits = {f: [] for f in FACTS}
    for b0 in range(0, len(records), batch):
        rows = []
        for s in records[b0:b0 + batch]:
            text = s["caption"]
            ids, labels = encode_conversation(
                [{"from": "human", "value": f"<image>\n{scenes.CAPTION_PROMPT}"}, {"from": "gpt", "value": text}],
                tokenizer, has_image=True, template="plain", double_bos=False)
            px = normalize(load_resized(str(Path(data_dir) / s["image"]), size, "square"))
            rows.append((np.asarray(ids), np.asarray(labels), px, _spans(text, _fact_values(s), tokenizer)))
        L = max(len(r[0]) for r in rows)
        ids = np.stack([np.pad(r[0], (0, L - len(r[0])), constant_values=tokenizer.pad_token_id) for r in rows])
        pred = np.asarray(fwd(params, ids, np.stack([r[2] for r in rows])).argmax(-1))
        for k, (row_ids, labels, _, spans) in enumerate(rows):
            q = np.flatnonzero(labels != IGNORE_INDEX)        # caption token j is supervised position q[j]
            ok = pred[k, q + T - 2] == row_ids[q]              # after the image: spliced position q + T - 1
            for f in FACTS:
                hits[f].append(bool(ok[spans[f]].all()))
    return {f: float(np.mean(h)) for f, h in hits.items()}
