"""Dense ground truth of a synthetic scene, per view and per ViT patch: stage 0's targets.

Every view a row of the miniature study feeds the vision tower is an s x s sub-image (s = 84 for the
tiny model, 6 x 6 patches of 14 px) cut from the scene at one scale:

    family       views  rows that use it               a patch covers (px of the 252 px scene)
    whole84      1      plain_336 (PIL resize to 84)   42 x 42
    local252     9      local_only, dcm_dem_1008       14 x 14 (one cell)
    strided252   9      strided_only, dcm_dem_1008     42 x 42 (crop (1, 1) is the low-res view)
    local168     4      dcm_dem_672                    21 x 21
    strided168   4      dcm_dem_672                    42 x 42
    low168       1      dcm_dem_672 (bicubic 168->84)  42 x 42

A patch's targets say what is where at the scale of its view, from the generator's layout
(scenes.scenes_<split>.jsonl), the same rule for every family:

    object   what covers the patch centre: background, the box or the circle, with its colour (11)
    x, y     the patch centre's column and row in the whole scene, in sixths (6 each)
    digit    the digit whose glyph centre lies in the patch, or none (7)
    count    the dot count of the cluster whose centre lies in the patch, or none (6)
    mark     "x" or "+" of the corner mark whose centre lies in the patch, or none (3)

Whether a target can be read from the pixels depends on the view: a glyph of 1 px strokes is
legible in a local252 patch and a smudge in a whole84 one, so the tower learns what each scale
shows and no row is given anything its pixels do not hold. x and y need no detail: in a local crop
they follow from where the frame (scenes.FRAME) appears.
"""
from __future__ import annotations

import numpy as np

from infllava_jax.study import scenes

SCENE = 252                      # the generator's image size the geometry below is written for
SIXTH = SCENE // 6               # 42 px: one x / y bin, one patch of a whole-scene view
HEADS = {"object": 1 + 2 * len(scenes.COLORS), "x": 6, "y": 6,
         "digit": 1 + len(scenes.ANSWERS["digit"]), "count": 1 + len(scenes.ANSWERS["count"]),
         "mark": 3}
SPARSE = ("digit", "count", "mark")   # 0 = none; most patches hold none
FAMILIES = {"whole84": 1, "local252": 9, "strided252": 9, "local168": 4, "strided168": 4, "low168": 1}
SIZES = (84, 168, 252)           # the scene sizes the families are cut from
# A strided crop is the whole scene subsampled at one phase, so its phases look alike: a training
# step takes one random phase of each strided family and every view of the others (17 of 28).
ONE_PHASE = ("strided252", "strided168")
# Views that show a detail pixel for pixel (a view pixel is at most 1.5 scene pixels, none skipped):
# there a detail head's target is the item's class; elsewhere only whether one is there.
LEGIBLE = ("local252", "local168")
_COLORS = list(scenes.COLORS)


def views(images: dict):
    """{84: (B, 84, 84, 3), 168: (B, 168, 168, 3), 252: (B, 252, 252, 3)} -> (B, V, 84, 84, 3), the
    families in FAMILIES order, cut with the model's own crops and resize (jax or numpy arrays)."""
    import jax.numpy as jnp

    from infllava_jax import crops
    from infllava_jax.pixels import resize_bicubic

    x84, x168, x252 = images[84], images[168], images[252]
    parts = [x84[:, None], crops.local_crops(x252, 3, 3), crops.strided_crops(x252, 3, 3),
             crops.local_crops(x168, 2, 2), crops.strided_crops(x168, 2, 2), resize_bicubic(x168, 84, 84)[:, None]]
    return jnp.concatenate(parts, axis=1)


def sample_views(rng: np.random.Generator, batch: int) -> np.ndarray:
    """(batch, 17) indices into the views of `views`: every view but one random phase of each
    ONE_PHASE family; the families stand at the same positions in every row (`view_families`)."""
    cols, start = [], 0
    for fam, n in FAMILIES.items():
        cols.append(start + rng.integers(n, size=(batch, 1)) if fam in ONE_PHASE else
                    np.broadcast_to(start + np.arange(n), (batch, n)))
        start += n
    return np.concatenate(cols, axis=1)


def view_families(sampled: bool = False) -> np.ndarray:
    """Family index (position in FAMILIES) of each view of `views` (sampled: of `sample_views`)."""
    return np.repeat(np.arange(len(FAMILIES)),
                     [1 if sampled and f in ONE_PHASE else n for f, n in FAMILIES.items()])


def footprints(grid: int = 6) -> np.ndarray:
    """(V, 3) int: per view, the scene pixel (y0, x0) of its patch (0, 0) and the patch side P; patch
    (y, x) covers [y0 + y P, y0 + (y + 1) P) x [x0 + x P, ...). Strided patches: pixel row r lies in
    patch r // 42 of its phase's crop, so every phase covers the whole-scene 42 px grid."""
    out = []
    for fam, n in FAMILIES.items():
        if fam.startswith("local"):
            k = int(np.sqrt(n))
            side = SCENE // k
            out += [(r * side, c * side, side // grid) for r in range(k) for c in range(k)]
        else:
            out += [(0, 0, SIXTH)] * n
    return np.array(out)


def _centres(fp: np.ndarray, grid: int) -> tuple[np.ndarray, np.ndarray]:
    """Patch centres (V, g*g) y and x in scene pixels."""
    k = (np.arange(grid) + 0.5)
    cy = fp[:, 0:1, None] + k[None, :, None] * fp[:, 2:3, None]
    cx = fp[:, 1:2, None] + k[None, None, :] * fp[:, 2:3, None]
    cy, cx = np.broadcast_arrays(cy, cx)
    return cy.reshape(len(fp), -1), cx.reshape(len(fp), -1)


def _holder(fp: np.ndarray, grid: int, y: float, x: float) -> np.ndarray:
    """(V,) flat index of the patch of each view whose footprint holds the point (y, x), -1 if none."""
    py = np.floor((y - fp[:, 0]) / fp[:, 2]).astype(int)
    px = np.floor((x - fp[:, 1]) / fp[:, 2]).astype(int)
    inside = (py >= 0) & (py < grid) & (px >= 0) & (px < grid)
    return np.where(inside, py * grid + px, -1)


def targets(record: dict, grid: int = 6) -> np.ndarray:
    """(V, grid*grid, len(HEADS)) int8 targets of one scene record (scenes.read_scenes)."""
    fp = footprints(grid)
    V, T = len(fp), grid * grid
    out = np.zeros((V, T, len(HEADS)), np.int8)
    cy, cx = _centres(fp, grid)
    names = list(HEADS)
    out[..., names.index("x")] = np.clip(cx // SIXTH, 0, 5)
    out[..., names.index("y")] = np.clip(cy // SIXTH, 0, 5)

    lay, col = record["layout"], record["colors"]
    (by, bx, bh, bw), (ry, rx, rh, rw) = lay["side"]
    obj = np.zeros((V, T), np.int8)
    r_out = rh / 2 - 2                                   # scenes._ring: outer radius 2.5 cell - 2
    in_circle = (cy - ry - (rh - 1) / 2) ** 2 + (cx - rx - (rw - 1) / 2) ** 2 <= r_out ** 2
    obj[in_circle] = 1 + len(_COLORS) + _COLORS.index(col["circle"])
    in_box = (cy >= by) & (cy < by + bh) & (cx >= bx) & (cx < bx + bw)
    obj[in_box] = 1 + _COLORS.index(col["box"])
    out[..., names.index("object")] = obj

    ans = record["answers"]
    gy, gx, gh, gw = lay["digit"]
    items = [("digit", gy + gh / 2, gx + gw / 2, 1 + scenes.ANSWERS["digit"].index(ans["digit"]))]
    oy, ox, span, _ = lay["count"]
    items.append(("count", oy + span / 2, ox + span / 2, 1 + scenes.ANSWERS["count"].index(ans["count"])))
    for corner, (my, mx, mh, mw) in zip(scenes.CORNERS, lay["corner"]):
        items.append(("mark", my + mh / 2, mx + mw / 2, 1 if corner == ans["corner"] else 2))
    v = np.arange(V)
    for head, y, x, label in items:
        where = _holder(fp, grid, y, x)
        ok = where >= 0
        out[v[ok], where[ok], names.index(head)] = label
    return out
