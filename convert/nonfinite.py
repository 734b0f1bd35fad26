"""NaN / Inf in the weights being converted: found while streaming (every piece read is checked),
refused by default with the tensor's name once every tensor has been read (before the output is
committed: raising inside Orbax's writer threads would print their tracebacks), converted as they
are with --allow-nonfinite (a warning names each tensor)."""
from __future__ import annotations

import numpy as np

from convert.errors import ConversionError


class NonFiniteWeightsError(ConversionError):
    pass


class FiniteCheck:
    """Leaf.check: counts non-finite values per torch key; `raise_if_found` refuses them unless allowed."""

    def __init__(self, allow: bool = False):
        self.allow, self.found = allow, {}   # key -> (file, count)

    def __call__(self, tensor, key: str, values: np.ndarray) -> None:
        if values.dtype.kind != "f" and "float" not in values.dtype.name:   # ml_dtypes report kind "V"
            return
        bad = int(np.count_nonzero(~np.isfinite(values)))
        if not bad:
            return
        where, n = self.found.get(key, (tensor.where, 0))
        self.found[key] = (where, n + bad)

    def raise_if_found(self) -> None:
        if self.found and not self.allow:
            key, (where, n) = sorted(self.found.items())[0]
            more = f" (and {len(self.found) - 1} more tensors)" if len(self.found) > 1 else ""
            raise NonFiniteWeightsError(f"{where}: tensor {key} holds {n} non-finite value(s) (NaN or Inf){more}; "
                                        f"pass --allow-nonfinite to convert it anyway")

    def warnings(self) -> list[str]:
        return [f"warning: {where}: tensor {key} holds {n} non-finite value(s) (NaN or Inf), converted as they are"
                for key, (where, n) in sorted(self.found.items())]
