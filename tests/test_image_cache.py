"""images.ImageCache: decoded once within its budget, refreshed when the file changes, and a
smaller pixel cap refuses an image a larger cap cached."""
import numpy as np
import pytest
from PIL import Image

from infllava_jax.data.images import ImageCache, TooManyPixels, load_resized


def test_cache_hits_refreshes_and_keeps_the_pixel_cap(tmp_path):
    p = tmp_path / "a.png"
    Image.fromarray(np.full((40, 40, 3), 200, np.uint8)).save(p)
    cache = ImageCache()
    a = cache.load(str(p), 16, "pad", budget_bytes=1 << 20)
    assert cache.load(str(p), 16, "pad", budget_bytes=1 << 20) is a and cache.nbytes == a.nbytes
    np.testing.assert_array_equal(a, load_resized(str(p), 16, "pad"))
    with pytest.raises(TooManyPixels):
        cache.load(str(p), 16, "pad", budget_bytes=1 << 20, max_pixels=100)
    Image.fromarray(np.full((40, 41, 3), 10, np.uint8)).save(p)            # a new file: not the cached one
    assert cache.load(str(p), 16, "pad", budget_bytes=1 << 20).max() < 200
    empty = ImageCache()
    empty.load(str(p), 16, "pad", budget_bytes=0)
    assert empty.nbytes == 0                                                    # over budget: not kept
