"""The code's shape, as issue 27 asks it to stay: short functions, one-way imports inside orinfer, and a bench that
uses the documented surface (bench/README.md) rather than the engine's internals."""
import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PRODUCT = sorted((ROOT / "orinfer").glob("*.py")) + [ROOT / "optimize.py", ROOT / "test_script.py"]


@pytest.mark.unit
def test_no_function_is_longer_than_60_lines():
    long = []
    for path in PRODUCT:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 60:
                long.append(f"{path.name}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert not long


def _imports(path: Path) -> set[str]:
    """The orinfer modules a module imports (relative imports, at any depth of the file)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            found |= {node.module} if node.module else {a.name for a in node.names}
    return found


@pytest.mark.unit
def test_orinfer_imports_run_one_way():
    graph = {p.stem: _imports(p) - {p.stem} for p in (ROOT / "orinfer").glob("*.py") if p.stem != "__init__"}
    done, path = set(), []

    def visit(module: str) -> None:
        assert module not in path, "import cycle: " + " -> ".join(path[path.index(module):] + [module])
        if module in done:
            return
        path.append(module)
        for dep in graph.get(module, ()):
            visit(dep)
        path.pop()
        done.add(module)
    for module in graph:
        visit(module)


WHITE_BOX = {"host_pass.py", "packed_tiles.py", "kernel_host_memory.py", "passes.py", "workload.py"}  # labelled in bench/README.md


@pytest.mark.unit
def test_bench_reads_no_engine_internals():
    """bench/ reaches the engine through optimize's Generator and its report()/reset()/warmup() (bench/README.md);
    the white-box micro-benchmarks, and workload.py's scripted engine, are named as such."""
    reaching = []
    for path in sorted((ROOT / "bench").glob("*.py")):
        if path.name in WHITE_BOX:
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"\.engine\b|\brunner[.=]|\b(gen|setup|model|observer)\._", line.split("#")[0]):
                reaching.append(f"{path.name}:{n}: {line.strip()}")
    assert not reaching
