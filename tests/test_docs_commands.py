"""Every command in the README's and docs/'s ```bash blocks is checked against the program it
runs: the program exists, and every flag it passes is one the program's own parser lists in
`--help` (`--config.a.b=...` overrides: a key of the config file the command names). A wrong
command fails here. What a user runs end to end is run by the journey tests on fixtures.

A command opts out by standing in a block fenced as ```text instead of ```bash (e.g. a line for
a cluster); programs that are not this repository's (pip, git, gcloud, ...) are only named.
"""
from __future__ import annotations

import functools
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SEPARATORS = {"&", "&&", ";", "|", "||"}
# programs that are not ours: a command may use them, the test does not look further
FOREIGN = {"pip", "git", "cd", "export", "gcloud", "srun", "curl", "tensorboard", "wait", "source", "mkdir",
           "ls", "cat", "rm", "cp", "kill", "echo", "unset", "lmms-eval", "accelerate", "python3.11", "tar"}
RUN_SH = {"study": ("-m", "infllava_jax.study"), "demo": ("-m", "infllava_jax.demo"), "test": None}


def bash_blocks(text: str) -> list[str]:
    return re.findall(r"^```bash\n(.*?)^```", text, re.S | re.M)


def commands(block: str) -> list[list[str]]:
    """Token lists of the commands of a block: continuation lines joined, comments dropped,
    `a && b`, `a & b`, `a | b` split, leading VAR=value assignments dropped."""
    out = []
    for line in block.replace("\\\n", " ").splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=";&")   # `a|b` stays a word: alternatives
        lexer.whitespace_split = True
        tokens, cmd = [t.strip("[]") for t in lexer], []
        for t in tokens + [";"]:
            if t in SEPARATORS:
                while cmd and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", cmd[0]):
                    cmd.pop(0)
                if cmd:
                    out.append(cmd)
                cmd = []
            else:
                cmd.append(t)
    return out


def target(cmd: list[str]) -> tuple[tuple[str, ...] | None, list[str]]:
    """(how python runs it, its arguments); (None, []) for a foreign program or a file that
    only has to exist. Unknown programs are an error."""
    prog, args = cmd[0], cmd[1:]
    if prog in ("python", "python3") or prog.endswith("/python"):
        if args[0] == "-m":
            return ("-m", args[1]), args[2:]
        return (args[0],), args[1:]
    if prog == "bash" and args[0] == "run.sh":
        assert args[1] in RUN_SH, f"bash run.sh {args[1]}: expected one of {sorted(RUN_SH)}"
        return RUN_SH[args[1]], args[2:]
    if prog in ("bash", "sbatch"):
        script = next(a for a in args if not a.startswith("-"))
        assert (ROOT / script).is_file(), f"{' '.join(cmd)}: no file {script}"
        return None, []
    assert prog in FOREIGN, f"{' '.join(cmd)}: {prog!r} is neither a command of this repository nor listed in FOREIGN"
    return None, []


# Prints {module: [exit code, output]} for `python -m MODULE --help` of each module named, all in
# one interpreter: jax and torch are imported once instead of once per program.
HELP_ALL = r"""
import contextlib, io, json, runpy, sys, traceback
out = {}
for mod in sys.argv[1:]:
    buf, code = io.StringIO(), None
    sys.argv = [mod, "--help"]
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        try:
            runpy.run_module(mod, run_name="__main__", alter_sys=True)
        except SystemExit as e:
            code = e.code
        except BaseException:
            traceback.print_exc()
            code = "Traceback"
    out[mod] = [code, buf.getvalue()]
sys.__stdout__.write(json.dumps(out))
"""


@functools.lru_cache(maxsize=None)
def module_helps(modules: tuple[str, ...]) -> dict[str, tuple[object, str]]:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    p = subprocess.run([sys.executable, "-c", HELP_ALL, *modules], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    return {m: tuple(v) for m, v in json.loads(p.stdout).items()}


@functools.lru_cache(maxsize=None)
def help_text(run: tuple[str, ...], sub: str | None) -> tuple[object, str]:
    """(exit code, output) of the program's `--help`: the `-m` programs of every documented
    command in one interpreter, each script (absl flags are global) in its own."""
    if run[0] == "-m" and sub is None:
        return module_helps(DOCUMENTED_MODULES)[run[1]] if run[1] in DOCUMENTED_MODULES \
            else module_helps((run[1],))[run[1]]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    argv = [sys.executable, *run, *([sub] if sub else []), "--help"]
    p = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    return p.returncode, p.stdout + p.stderr


def help_flags(run: tuple[str, ...], sub: str | None) -> frozenset[str]:
    """The flags a program's `--help` lists (absl's `--[no]x` as x and nox)."""
    code, text = help_text(run, sub)
    # absl's --help exits 1 after printing the flags; argparse's exits 0
    assert code in (0, 1, None) and "Traceback" not in text and "--" in text, \
        f"{' '.join(run)} --help: exit {code}\n{text[-2000:]}"
    flags = set()
    for neg, name in re.findall(r"--(\[no\])?([A-Za-z0-9][A-Za-z0-9_.-]*)", text):
        flags |= {name, f"no{name}"} if neg else {name}
    return frozenset(flags)


def config_keys(spec: str) -> set[str]:
    """Dotted keys of the config `--config FILE[:ARGS]` builds."""
    path, _, arg = spec.partition(":")
    module = importlib.util.module_from_spec(importlib.util.spec_from_file_location("doc_config", ROOT / path))
    module.__spec__.loader.exec_module(module)
    cfg = module.get_config(arg or None).to_dict()

    def walk(d, prefix=""):
        for k, v in d.items():
            yield prefix + k
            if isinstance(v, dict):
                yield from walk(v, f"{prefix}{k}.")
    return set(walk(cfg))


def check(cmd: list[str]) -> None:
    run, args = target(cmd)
    if run is None:
        return
    if run[0] == "-m":
        assert importlib.util.find_spec(run[1]) is not None, f"{' '.join(cmd)}: no module {run[1]}"
    else:
        assert (ROOT / run[0]).is_file(), f"{' '.join(cmd)}: no file {run[0]}"
    if not any(a.startswith("--") and a != "--" for a in args):
        return   # nothing to look up (and a script without a parser would run on --help)
    sub = args[0] if run == ("eval.py",) and args and args[0] in ("score", "demo") else None
    known = help_flags(run, sub)
    spec = next((a.split("=", 1)[1] if "=" in a else args[i + 1] for i, a in enumerate(args)
                 if a == "--config" or a.startswith("--config=")), None)
    for a in args:
        if not a.startswith("--") or a == "--":
            continue
        name = a[2:].split("=", 1)[0]
        if name.startswith("config.") and spec:
            assert name[len("config."):] in config_keys(spec), f"{' '.join(cmd)}: {spec} has no key {name[7:]!r}"
        else:
            assert name in known, f"{' '.join(cmd)}: {' '.join(run)} has no flag --{name}"


CASES = [(doc.relative_to(ROOT), i, c) for doc in DOCS for block in bash_blocks(doc.read_text())
         for i, c in enumerate(commands(block))]


def documented_modules() -> tuple[str, ...]:
    """The `-m` programs whose `--help` the cases will read (a bad command fails in its own case)."""
    mods = set()
    for _, _, cmd in CASES:
        try:
            run, args = target(cmd)
        except AssertionError:
            continue
        if run and run[0] == "-m" and any(a.startswith("--") and a != "--" for a in args):
            mods.add(run[1])
    return tuple(sorted(mods))


DOCUMENTED_MODULES = documented_modules()


@pytest.mark.parametrize("doc,i,cmd", CASES, ids=[f"{d}:{' '.join(c)[:60]}" for d, i, c in CASES])
def test_documented_command(doc, i, cmd):
    check(cmd)


def test_the_checker_catches_wrong_commands():
    """The README once showed `python -m convert CLIP_DIR LLAMA3_DIR W0` and a flag that did not
    exist; a made-up flag, a made-up config key and an unknown program must all fail."""
    for bad in ("python -m convert SRC DST --no-such-flag",
                "python train.py --config configs/tiny.py --config.optimizer.lrr=1 --workdir W",
                "frobnicate --x"):
        with pytest.raises(AssertionError):
            check(commands(bad)[0])
    check(commands("python train.py --config configs/tiny.py --config.optimizer.lr=1 --workdir W")[0])


@pytest.mark.slow   # builds a tiny checkpoint and generates
def test_the_readme_python_example_runs(tmp_path, monkeypatch, capsys):
    """README.md's python block, exec'd as written (the checkpoint path substituted)."""
    from infllava_jax.evaluation import demo_fixtures
    code = re.search(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    assert '"CKPT"' in code
    demo_fixtures.make_tiny_checkpoint(tmp_path / "ckpt", grid=2)
    monkeypatch.chdir(ROOT)
    scope: dict = {}
    exec(compile(code.replace('"CKPT"', repr(str(tmp_path / "ckpt"))), "README.md", "exec"), scope)
    from infllava_jax.api import InfLlava
    assert isinstance(scope["model"], InfLlava) and capsys.readouterr().out.endswith("\n")   # the answer printed
