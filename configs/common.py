"""Helpers shared by the config files (big_vision style: `--config configs/x.py:k=v,k2=v2`)."""


def parse_arg(arg: str | None, **defaults) -> dict:
    """'a=1,b=x' -> {'a': 1, 'b': 'x'} over `defaults` (values take the defaults' types)."""
    out = dict(defaults)
    for kv in filter(None, (arg or "").split(",")):
        k, _, v = kv.partition("=")
        if k not in out:
            raise ValueError(f"config argument {k!r}; expected one of {sorted(out)}")
        out[k] = type(out[k])(v) if out[k] is not None else v
    return out
