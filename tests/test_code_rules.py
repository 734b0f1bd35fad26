"""Rules the code keeps (issue 12): short functions, and library code that needs no scripts."""
import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 60
DATA_GENERATORS = {"infllava_jax/data/synthetic.py": 80}   # scene renderers may take a little more


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
