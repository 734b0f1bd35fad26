"""Evaluation sweeps (big_vision style): `--config configs/eval.py:tasks=pope+scienceqa_img,res=336+672+1008`.

The argument is `key=value` pairs separated by commas; list values use "+". Any field can also
be overridden with `--config.<field>=<value>` (tuples as Python literals, e.g.
`--config.res="(336, 1008)"`).

Resolutions are in CLIP-336 units: res = 336 * n runs the model on an n x n grid with the
released DEM operations (docs/model.md §4, "Other grids"); 336 is the 1 x 1 grid (DEM still applied), the
released model's own point is 1008. `pixels="released"` feeds 336-px (sub-image sized) images
that the model upsamples bicubically to n*336, as the released inference loader does;
`pixels="native"` preprocesses straight to n*336.
"""
from infllava_jax.evaluation.config import get_config  # noqa: F401  (the fields and defaults)
