"""The one override syntax of train.py, eval.py and `python -m infllava_jax.plan`:

    --config FILE.py[:k=v,k2=v2]     a config file (its get_config(arg)) and its arguments
    --config.a.b=VALUE               any field of the config it returns (also `--config.a.b VALUE`)

A config file's arguments are `key=value` pairs joined by commas; a list value joins its items
with "+" (`res=336+1008`). A field's VALUE takes the field's type: true/false (or 1/0, yes/no)
for a flag, a number, a string, a list as `a+b` or a Python literal `(1, 2)`. Everything is
checked before anything runs: a missing file, an unknown key or a value of the wrong type or
range is a ConfigError whose one line names the key, says what is accepted and suggests the
closest name (docs/configuration.md).
"""
from __future__ import annotations

import argparse
import ast
import difflib
import importlib.util
import os
import sys
from typing import Any, Iterable, Mapping

from ml_collections import ConfigDict

from infllava_jax.errors import InputError, one_line

TRUE, FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


class ConfigError(InputError):
    """A config file, key or value that is not accepted (one line, naming it)."""


def did_you_mean(name: str, options: Iterable[str]) -> str:
    """' (did you mean X?)' for the closest of `options`, or ''."""
    options = list(options)
    close = difflib.get_close_matches(name, options, n=1, cutoff=0.6) or \
        [o for o in options if name and len(o) >= 3 and (name.startswith(o) or o.startswith(name))][:1]  # resolution
    return f" (did you mean {close[0]}?)" if close else ""


# ----------------------------------------------------------------------------- values

def parse_value(key: str, old: Any, text: str) -> Any:
    """`text` as a value of `key`, whose current value `old` gives the type."""
    if isinstance(old, bool):
        if text.lower() in TRUE + FALSE:
            return text.lower() in TRUE
        raise ConfigError(f"{key}={text}: expected true or false")
    if isinstance(old, (int, float)):
        typ = type(old)
        try:
            return typ(text) if typ is float else int(text)
        except ValueError:
            raise ConfigError(f"{key}={text}: expected {'an integer' if typ is int else 'a number'}") from None
    if isinstance(old, (tuple, list)):
        return _parse_list(key, old, text)
    if isinstance(old, (ConfigDict, dict)):
        raise ConfigError(f"{key} is a group of fields: set one of them, e.g. {key}.{next(iter(old), 'x')}=...; "
                          f"its keys: {', '.join(old)}")
    if old is None:          # no type to follow: a Python literal if it is one, else the text
        try:
            return ast.literal_eval(text)
        except (ValueError, SyntaxError):
            return text
    return text


def _parse_list(key: str, old, text: str) -> tuple:
    if text.strip()[:1] in "([":
        try:
            items = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            raise ConfigError(f"{key}={text}: not a Python list or tuple literal") from None
        items = items if isinstance(items, (tuple, list)) else (items,)
    else:
        items = [t for t in text.replace(",", "+").split("+") if t.strip()]
    like = old[0] if len(old) else None      # an empty default: numbers where the items are numbers
    if isinstance(like, str):
        return tuple(str(i).strip() for i in items)
    return tuple(parse_value(key, like, str(i).strip()) if isinstance(i, str) else i for i in items)


# ----------------------------------------------------------------------------- config files

def parse_arg(arg: str | None, **defaults) -> dict:
    """A config file's argument 'a=1,b=x+y' -> {'a': 1, 'b': ...} over `defaults` (values take
    the defaults' types; list defaults take '+'-joined items)."""
    out = dict(defaults)
    for part in filter(None, (p.strip() for p in (arg or "").split(","))):
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep:
            raise ConfigError(f"argument {part!r}: expected key=value with key one of {', '.join(out)}")
        if key not in out:
            raise ConfigError(f"unknown argument {key!r}; accepted: {', '.join(out)}{did_you_mean(key, out)}")
        out[key] = parse_value(key, out[key], value.strip())
    return out


def load_config(spec: str) -> ConfigDict:
    """'configs/<name>.py[:args]' -> its get_config(args)."""
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        folder = os.path.dirname(path) or "."
        near = sorted(os.path.join(os.path.dirname(path), f) for f in os.listdir(folder)
                      if f.endswith(".py") and not f.startswith("_")) if os.path.isdir(folder) else []
        raise ConfigError(f"--config {path}: no such config file"
                          + (f"; in {folder}: {', '.join(near)}{did_you_mean(path, near)}" if near else ""))
    mod_spec = importlib.util.spec_from_file_location(f"_config_{abs(hash(path))}", path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    if not hasattr(mod, "get_config"):
        raise ConfigError(f"--config {path}: a config file defines get_config(arg)")
    try:
        return mod.get_config(arg or None)
    except (ValueError, KeyError, TypeError) as e:       # the arguments (parse_arg) or the file's own checks
        raise ConfigError(f"--config {path}: {e.args[0] if isinstance(e, KeyError) else e}") from None


def apply(cfg: ConfigDict, sets: Mapping[str, str]) -> ConfigDict:
    """cfg with {'a.b': 'text'} overrides, each parsed as its field's type."""
    for key, text in sets.items():
        node, parts = cfg, key.split(".")
        for i, part in enumerate(parts):
            if not isinstance(node, (ConfigDict, dict)) or part not in node:
                here = ".".join(parts[:i])
                opts = list(node) if isinstance(node, (ConfigDict, dict)) else []
                raise ConfigError(f"--config.{key}: unknown key {part!r}"
                                  + (f" in config.{here}" if here else "")
                                  + (f"; accepted: {', '.join(opts)}{did_you_mean(part, opts)}" if opts else ""))
            if i < len(parts) - 1:
                node = node[part]
        node[parts[-1]] = parse_value(f"--config.{key}", node[parts[-1]], text)
    return cfg


# ----------------------------------------------------------------------------- command lines

def split_argv(argv: list[str]) -> tuple[str | None, dict[str, str], list[str]]:
    """argv -> (the --config spec, {field: text} of the --config.<field> flags, the other args)."""
    spec, sets, rest, i = None, {}, [], 0
    while i < len(argv):
        a = argv[i]
        name, eq, value = a.partition("=")
        if name in ("--config", "-config") or name.startswith(("--config.", "-config.")):
            if not eq:
                if i + 1 >= len(argv):
                    raise ConfigError(f"{name}: expects a value ({name}=VALUE)")
                i, value = i + 1, argv[i + 1]
            if name.lstrip("-") == "config":
                spec = value
            else:
                sets[name.lstrip("-")[len("config."):]] = value
        else:
            rest.append(a)
        i += 1
    return spec, sets, rest


def from_argv(argv: list[str], default_spec: str | None = None) -> tuple[ConfigDict, list[str]]:
    """(the config the command line asks for, the other arguments). Raises ConfigError."""
    spec, sets, rest = split_argv(argv)
    spec = spec or default_spec
    if spec is None:
        raise ConfigError("--config: missing (e.g. --config configs/tiny.py)")
    return apply(load_config(spec), sets), rest


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line `prog: error: ...` and exit 2 (without the usage lines)."""

    def error(self, message):
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def fail(prog: str, e: BaseException) -> None:
    """Print `prog: error: <one line>` on stderr and exit 2."""
    print(f"{prog}: error: {one_line(e, 1000)}", file=sys.stderr, flush=True)
    raise SystemExit(2)


# ----------------------------------------------------------------------------- checks

def check(cfg: ConfigDict, rules: Mapping[str, Any], prefix: str = "config") -> None:
    """Check fields against rules {'a.b': ('x', 'y') choices | (low, high) range | callable -> error or None}.
    A range is a list [low, high] (either None: unbounded)."""
    for key, rule in rules.items():
        node = cfg
        for part in key.split("."):
            node = node[part]
        if callable(rule):
            problem = rule(node)
        elif isinstance(rule, list):
            low, high = rule
            ok = isinstance(node, (int, float)) and not isinstance(node, bool) \
                and (low is None or node >= low) and (high is None or node <= high)
            problem = None if ok else "expected a number " + (
                f"in [{low}, {high}]" if low is not None and high is not None else
                f">= {low}" if low is not None else f"<= {high}")
        else:
            names = [repr(v) if v == "" else str(v) for v in rule]
            problem = None if node in rule else f"accepted: {', '.join(names)}{did_you_mean(str(node), names)}"
        if problem:
            raise ConfigError(f"{prefix}.{key}={node!r}: {problem}")
