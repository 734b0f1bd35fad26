"""Stage 0's dense targets (infllava_jax/study/targets.py): every label sits on the patch
of the view whose pixels show the item, for every family of views the study's rows feed the tower."""
import numpy as np
import pytest

from infllava_jax.study import scenes as S
from infllava_jax.study import targets as st
from infllava_jax.data.images import resize_uint8

NAMES = list(st.HEADS)


@pytest.fixture(scope="module")
def scenes():
    out = []
    for i in range(6):
        s = S.scene(5, "train", i, 6)
        from PIL import Image
        im = Image.fromarray(s.image)
        images = {size: resize_uint8(im, size, "square")[None] for size in st.SIZES}
        out.append((S.scene_record(s, ""), s, np.asarray(st.views(images))[0]))
    return out


def test_families_and_footprints():
    fp = st.footprints()
    assert len(fp) == sum(st.FAMILIES.values()) == 28
    fam = np.array(list(st.FAMILIES))[st.view_families()]
    assert (fp[fam == "local252", 2] == 14).all() and (fp[fam == "local168", 2] == 21).all()
    assert (fp[(fam != "local252") & (fam != "local168"), 2] == 42).all()
    assert sorted(map(tuple, fp[fam == "local252", :2])) == [(84 * r, 84 * c) for r in range(3) for c in range(3)]


def test_sample_views_takes_one_phase_of_each_strided_family():
    idx = st.sample_views(np.random.default_rng(0), 5)
    fam = np.array(list(st.FAMILIES))[st.view_families()]
    sampled = np.array(list(st.FAMILIES))[st.view_families(sampled=True)]
    assert idx.shape == (5, len(sampled)) == (5, 17)
    assert (fam[idx] == sampled).all()                         # every row: the same family per column
    assert len(np.unique(idx[:, list(sampled).index("strided252")])) > 1   # the phase is drawn per row


def _ink_in_patch(view, patch, ink):
    y, x = divmod(patch, 6)
    return (np.abs(view[14 * y:14 * y + 14, 14 * x:14 * x + 14].astype(int) - ink).max(-1) <= 2).sum()


def test_detail_labels_sit_on_the_patch_that_shows_the_item(scenes):
    fam = np.array(list(st.FAMILIES))[st.view_families()]
    for rec, s, views in scenes:
        t = st.targets(rec)
        assert t.shape == (28, 36, len(NAMES)) and t.dtype == np.int8
        digit = 1 + S.ANSWERS["digit"].index(rec["answers"]["digit"])
        count = 1 + S.ANSWERS["count"].index(rec["answers"]["count"])
        for head, label, ink_px in (("digit", digit, S.FONT[rec["answers"]["digit"]].sum()),
                                    ("count", count, 1)):
            k = NAMES.index(head)
            for v in np.flatnonzero(fam == "local252"):
                on = np.flatnonzero(t[v, :, k])
                assert len(on) <= 1 and set(t[v, :, k]) <= {0, label}
                if len(on):   # the patch holds the item's ink (digit: every glyph pixel)
                    assert _ink_in_patch(views[v], on[0], s.ink) >= ink_px
            # every whole-scene view has it on exactly one patch, the one 42 px cell that holds it
            for v in np.flatnonzero(fam != "local252"):
                assert (t[v, :, k] == label).sum() <= 1
            assert sum((t[v, :, k] == label).sum() for v in np.flatnonzero(fam == "local252")) == 1
        marks = t[np.flatnonzero(fam == "local252"), :, NAMES.index("mark")]
        assert (marks == 1).sum() == 1 and (marks == 2).sum() == 3        # one x, three +


def test_position_and_object_targets(scenes):
    fam = np.array(list(st.FAMILIES))[st.view_families()]
    for rec, s, views in scenes:
        t = st.targets(rec)
        v = list(fam).index("local252") + 5                  # local crop (1, 2): cells 6..11 x 12..17
        x, y = t[v, :, NAMES.index("x")].reshape(6, 6), t[v, :, NAMES.index("y")].reshape(6, 6)
        assert (x == np.array([4, 4, 4, 5, 5, 5])).all() and (y == np.array([2, 2, 2, 3, 3, 3])[:, None]).all()
        whole = t[0, :, NAMES.index("x")].reshape(6, 6)
        assert (whole == np.arange(6)).all()
        box = 1 + list(S.COLORS).index(rec["colors"]["box"])
        local = t[np.flatnonzero(fam == "local252"), :, NAMES.index("object")]
        assert (local == box).sum() == S.OBJECT ** 2       # one patch per cell of the box
        assert (t[0, :, NAMES.index("object")] > 0).any()    # the 84 px view sees both objects
