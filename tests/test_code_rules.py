"""Rules the code keeps (issue 12): short functions, and library code that needs no scripts."""
import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 60
DATA_GENERATORS = {"infllava_jax/study/scenes.py": 80}   # scene renderers may take a little more


def _sources():
    files = [*ROOT.glob("infllava_jax/**/*.py"), *ROOT.glob("convert/**/*.py"), ROOT / "train.py", ROOT / "eval.py"]
    return sorted(f for f in files if f.is_file())


def test_no_long_functions():
    too_long = []
    for f in _sources():
        rel = str(f.relative_to(ROOT))
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                limit = DATA_GENERATORS.get(rel, MAX_LINES)
                if n > limit:
                    too_long.append(f"{rel}:{node.lineno} {node.name}: {n} lines (limit {limit})")
    assert not too_long, "\n".join(too_long)


def test_library_code_needs_no_scripts():
    """Nothing in the package, the converters or the benchmarks imports train.py, eval.py or the
    tests, edits sys.path, or imports JAX's private modules."""
    bad = re.compile(r"^\s*(import (train|eval|tests)\b|from (train|eval|tests)\b|.*sys\.path\.(insert|append))"
                     r"|jax\._src", re.M)
    files = [f for d in ("infllava_jax", "convert", "benchmarks") for f in ROOT.glob(f"{d}/**/*.py")]
    found = [f"{f.relative_to(ROOT)}: {m.group(0).strip()}" for f in files for m in bad.finditer(f.read_text())]
    assert not found, found


# ----------------------------------------------------------------------------- the import graph

PACKAGES = ("infllava_jax", "convert")


def _module_name(f: Path) -> str:
    parts = list(f.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(f: Path, modules: set[str]) -> set[str]:
    """Every project module `f` imports, at any depth (function-level imports included):
    `from pkg import name` is pkg.name when that is a module, else pkg."""
    me = _module_name(f)
    package = me if f.name == "__init__.py" else me.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(f.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            out |= {f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names}
    return {m for m in out if m in modules and m != me}


def _graph() -> dict[str, set[str]]:
    files = [f for p in PACKAGES for f in ROOT.glob(f"{p}/**/*.py")]
    modules = {_module_name(f) for f in files} | {"configs", *(f"configs.{f.stem}" for f in ROOT.glob("configs/*.py"))}
    return {_module_name(f): _imports(f, modules) for f in files}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    """The package and the converters import each other in one direction only (function-level
    imports count: they are cycles that merely run later)."""
    assert not _cycles(_graph()), _cycles(_graph())


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_library_never_reaches_up():
    """infllava_jax/ imports neither the user's config files nor the converters (the trainer is
    handed what it needs from them, e.g. train.py's save_adapters)."""
    up = {m: sorted(i for i in deps if i.split(".")[0] in ("configs", "convert"))
          for m, deps in _graph().items() if m.startswith("infllava_jax")}
    assert not {m: d for m, d in up.items() if d}, up


def test_nothing_cites_files_outside_the_repository():
    """The model's definition and the benchmark protocol are docs/model.md and docs/evaluation.md."""
    pat = re.compile(r"\bSPEC(\.md| section| \d)|EVAL_PROTOCOL|\.\./shared")
    files = [f for f in ROOT.rglob("*") if f.suffix in (".py", ".md", ".sh", ".toml", ".txt", ".sbatch")
             and not {".venv", ".git", "node_modules"} & set(f.relative_to(ROOT).parts) and f != Path(__file__)]
    found = [f"{f.relative_to(ROOT)}:{i}" for f in files for i, line in enumerate(f.read_text().splitlines(), 1)
             if pat.search(line)]
    assert not found, found
