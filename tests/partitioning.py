"""Test helper: every parameter carries logical axis names (sharding.LOGICAL_RULES applies to it)."""
import flax.linen as nn
import jax


def assert_all_partitioned(boxed_params, where: str = "params") -> None:
    """Raise if any leaf lacks logical axis names (or has a rank mismatch)."""
    flat = jax.tree_util.tree_flatten_with_path(
        boxed_params, is_leaf=lambda x: isinstance(x, nn.Partitioned))[0]
    for path, leaf in flat:
        key = jax.tree_util.keystr(path)
        if not isinstance(leaf, nn.Partitioned):
            raise AssertionError(f"{where}{key}: no logical axis names")
        if len(leaf.names) != leaf.value.ndim:
            raise AssertionError(f"{where}{key}: names {leaf.names} for shape {leaf.value.shape}")
