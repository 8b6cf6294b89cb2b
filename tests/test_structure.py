"""The code's shape, as issue 27 asks it to stay: short functions, one-way imports inside orinfer, and a bench that
uses the documented surface (bench/README.md) rather than the engine's internals."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PRODUCT = sorted((ROOT / "orinfer").rglob("*.py")) + [ROOT / "optimize.py", ROOT / "test_script.py"]


@pytest.mark.unit
def test_no_function_is_longer_than_60_lines():
    long = []
    for path in PRODUCT:
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                and node.end_lineno - node.lineno + 1 > 60
            ):
                long.append(
                    f"{path.name}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
                )
    assert not long


def _module(path: Path) -> str:
    """A file's module name inside orinfer: "engine", "attention.varlen", "attention" (a package's __init__)."""
    parts = path.relative_to(ROOT / "orinfer").with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """The orinfer modules a module imports (relative imports, at any depth of the file), by module name."""
    package = (
        _module(path).split(".") if path.name == "__init__.py" else _module(path).split(".")[:-1]
    )
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
            if node.module:
                found.add(".".join(base + node.module.split(".")))
            else:  # from . import a, b: submodules of the package
                found |= {".".join(base + [alias.name]) for alias in node.names}
    return {name.strip(".") for name in found}


@pytest.mark.unit
def test_orinfer_imports_run_one_way():
    graph = {
        _module(p): _imports(p) - {_module(p)}
        for p in (ROOT / "orinfer").rglob("*.py")
        if _module(p)
    }
    done, path = set(), []

    def visit(module: str) -> None:
        assert module not in path, "import cycle: " + " -> ".join(
            path[path.index(module) :] + [module]
        )
        if module in done:
            return
        path.append(module)
        for dep in sorted(graph.get(module, ())):
            visit(dep)
        path.pop()
        done.add(module)

    for module in graph:
        visit(module)


@pytest.mark.unit
def test_the_engine_runner_and_memory_plan_never_name_an_attention_backend():
    """They read a backend's declared contract (attention.core.Backend); only the registry names one."""
    for name in ("engine.py", "runner.py", "memory.py", "scheduler.py", "warmup.py", "graphs.py"):
        tree = ast.parse((ROOT / "orinfer" / name).read_text())
        named = [
            node.value
            for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and node.value in ("varlen", "padded", "reference")
        ]
        imported = [
            node.module
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom)
            and node.module
            in ("attention.varlen", "attention.padded", "attention.float32_reference")
        ]
        assert not named and not imported, name


WHITE_BOX = {
    "host_pass.py",
    "packed_tiles.py",
    "kernel_host_memory.py",
    "passes.py",
    "workload.py",
}  # labelled in bench/README.md


@pytest.mark.unit
def test_bench_reads_no_engine_internals():
    """bench/ reaches the engine through optimize's Generator and its report()/reset()/warmup()/describe()
    (bench/README.md), read from its syntax tree: no `.engine` or `.runner` attribute, no private attribute of a
    generator, set-up, model or observer, no import of the engine's modules; the white-box micro-benchmarks, and
    workload.py's scripted engine, are named as such."""
    internal = {
        "orinfer.engine",
        "orinfer.runner",
        "orinfer.scheduler",
        "orinfer.attention",
        "orinfer.speculation",
    }
    reaching = []
    for path in sorted((ROOT / "bench").glob("*.py")):
        if path.name in WHITE_BOX:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and (
                node.attr in ("engine", "runner")
                or (
                    node.attr.startswith("_")
                    and not node.attr.startswith("__")
                    and isinstance(node.value, ast.Name)
                    and node.value.id in ("gen", "setup", "model", "observer")
                )
            ):
                reaching.append(f"{path.name}:{node.lineno}: .{node.attr}")
            module = getattr(node, "module", None) or ""
            if isinstance(node, ast.ImportFrom) and any(
                module == m or module.startswith(m + ".") for m in internal
            ):
                reaching.append(f"{path.name}:{node.lineno}: from {module}")
    assert not reaching
