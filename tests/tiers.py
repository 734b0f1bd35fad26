"""The two test tiers: `pytest -m "not slow"` for day-to-day work, everything for CI.

A parametrized test keeps its most telling case or two in the fast tier and runs the rest of its
cases only in the full run: `@pytest.mark.parametrize("a,b", [(1, 2), *slow((3, 4), (5, 6))])`.
"""
import pytest


def slow(*cases):
    """Cases (tuples of the parametrize arguments, or single values) marked slow."""
    return [pytest.param(*(c if isinstance(c, tuple) else (c,)), marks=pytest.mark.slow) for c in cases]
