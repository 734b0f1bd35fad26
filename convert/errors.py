"""Errors the converter reports to users as one line (the CLI prints `error: <message>`, exit 2)."""
from __future__ import annotations


class ConversionError(Exception):
    """A problem with the user's input (files, keys, shapes, options), not a bug."""


class UnsafeCheckpointError(ConversionError):
    """A pickle that `torch.load(weights_only=True)` refuses: it would run code to load."""


class MissingKeysError(ConversionError, KeyError):
    def __str__(self):  # KeyError would quote the message
        return str(self.args[0])


class ShapeMismatchError(ConversionError, ValueError):
    pass


class UnexpectedKeysError(ConversionError, ValueError):
    pass


def listing(items, limit: int = 8) -> str:
    """'a, b, c' or 'a, b, ... (N total)'."""
    items = list(items)
    s = ", ".join(items[:limit])
    return s if len(items) <= limit else f"{s}, ... ({len(items)} total)"
