"""The static splice equals a plain Python list splice, for any sentinel positions and counts."""
import numpy as np
import jax.numpy as jnp

from infllava_jax.splice import (IGNORE_INDEX, IMAGE_TOKEN_INDEX, splice_attention_mask,
                                 splice_embeddings, splice_labels, splice_layout)


def _reference(ids, mask, labels, text, images, T):
    emb, m, lab, k = [], [], [], 0
    for t, (i, mm, ll) in enumerate(zip(ids, mask, labels)):
        if i == IMAGE_TOKEN_INDEX:
            emb += list(images[k]); m += [mm] * T; lab += [IGNORE_INDEX] * T; k += 1
        else:
            emb.append(text[t]); m.append(mm); lab.append(ll)
    return np.array(emb), np.array(m), np.array(lab)


def test_splice_matches_list_splice():
    rng = np.random.default_rng(0)
    B, L, T, K, D = 3, 11, 4, 2, 5
    ids = rng.integers(0, 50, (B, L))
    ids[0, [0, 5]] = IMAGE_TOKEN_INDEX        # at the start and in the middle
    ids[1, [9, 10]] = IMAGE_TOKEN_INDEX       # adjacent, at the end
    ids[2, 3] = IMAGE_TOKEN_INDEX             # fewer sentinels than K: tail is invalid
    mask = (rng.random((B, L)) > 0.2).astype(np.int32)
    labels = rng.integers(0, 50, (B, L))
    text = rng.normal(size=(B, L, D)).astype(np.float32)
    images = rng.normal(size=(B, K, T, D)).astype(np.float32)

    lay = splice_layout(jnp.asarray(ids), T, K)
    emb = np.asarray(splice_embeddings(jnp.asarray(text), jnp.asarray(images), lay))
    m = np.asarray(splice_attention_mask(jnp.asarray(mask), lay))
    lab = np.asarray(splice_labels(jnp.asarray(labels), lay))
    assert emb.shape == (B, L + K * (T - 1), D)
    for b in range(B):
        re, rm, rl = _reference(ids[b], mask[b], labels[b], text[b], images[b], T)
        n = len(re)
        np.testing.assert_array_equal(emb[b, :n], re)
        np.testing.assert_array_equal(m[b, :n], rm)
        np.testing.assert_array_equal(lab[b, :n], rl)
        assert (m[b, n:] == 0).all() and (lab[b, n:] == IGNORE_INDEX).all()
