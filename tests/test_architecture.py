"""The layout holds: arrows point one way (app → components → merging; inside merging, from the top rooms down),
no import cycles, nothing in the library knows the UI, plotly only in the chart builders, no oversized module.
docs/ARCHITECTURE.md describes the same rooms."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MAX_LINES = 450

# The rooms, bottom first. A module may import its own room and the rooms below it, never one above.
ROOMS: list[tuple[str, tuple[str, ...]]] = [
    ("foundations", ("merging.errors", "merging.safetensors_io", "merging.synthetic", "merging.bands",
                     "merging.memory", "merging.architectures", "merging.yaml_budget",
                     "merging.budget", "merging.limits")),
    ("sources and kernels", ("merging.sources", "merging.native")),
    ("methods", ("merging.methods", "merging.params")),
    ("config", ("merging.config",)),
    ("plan", ("merging.plan", "merging.tasks", "merging.slices", "merging.tokenizers")),
    ("engine", ("merging.engine", "merging.reads", "merging.resources", "merging.writer", "merging.nonfinite",
                "merging.whole_model")),
    ("library top", ("merging.analysis", "merging.advice", "merging.hub", "merging.zoo", "merging.evaluate",
                     "merging.report", "merging.charts",
                     "merging.bench", "merging.demo", "merging.inspect", "merging.emr_store", "merging.emr_cli",
                     "merging.analysis_cli", "merging.methods_cli", "merging.__main__", "merging")),
    ("ui", ("components",)),
    ("app", ("app",)),
]
PLOTLY_ALLOWED = ("merging.charts", "merging.zoo.charts", "merging.evaluate.charts")


def modules() -> dict[str, Path]:
    found = {}
    for path in [*ROOT.glob("merging/**/*.py"), *ROOT.glob("components/**/*.py"), ROOT / "app.py"]:
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def imports_of(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """Every project module ``name`` imports (at module level or inside functions), and external top-level names."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else [])) \
                if node.level else node.module
            subs = {f"{base}.{a.name}" for a in node.names} & known.keys()
            out |= subs
            if len(subs) < len(node.names):
                out.add(base)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
    return {_owner(m, known) for m in out} - {name}


def _owner(module: str, known: dict[str, Path]) -> str:
    """The project module a dotted import lands in (``merging.native.ops`` → itself; ``torch.nn`` → ``torch``)."""
    while module and module not in known and "." in module:
        module = module.rpartition(".")[0]
    return module


def room_of(module: str) -> int:
    best, rank = -1, -1
    for i, (_, prefixes) in enumerate(ROOMS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, rank = len(prefix), i
    assert rank >= 0, f"{module} is in no room of tests/test_architecture.py (and of docs/ARCHITECTURE.md)"
    return rank


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports_of(name, path, known) for name, path in known.items()}


def test_arrows_point_down_only():
    known = modules()
    upward = []
    for name, deps in graph().items():
        for dep in deps & known.keys():
            if room_of(dep) > room_of(name):
                upward.append(f"{name} ({ROOMS[room_of(name)][0]}) imports {dep} ({ROOMS[room_of(dep)][0]})")
    assert not upward, "\n".join(upward)


def test_no_import_cycles():
    edges = {k: {d for d in v if d in modules()} for k, v in graph().items()}
    # a package's __init__ is imported by each of its modules; it must not import them back at import time
    index, low, stack, on_stack, cycles, counter = {}, {}, [], set(), [], [0]

    def connect(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in edges:
        if v not in index:
            connect(v)
    assert not cycles, cycles


def test_the_library_knows_no_ui_and_only_the_chart_builders_know_plotly():
    for name, deps in graph().items():
        if not name.startswith("merging"):
            continue
        assert not {"gradio", "components", "app"} & deps, f"{name} imports the UI: {deps}"
        if "plotly" in deps:
            assert name in PLOTLY_ALLOWED, f"{name} imports plotly; only {PLOTLY_ALLOWED} may"


def test_no_module_is_over_the_size_limit():
    files = [*ROOT.glob("merging/**/*.py"), *ROOT.glob("merging/**/*.c"), *ROOT.glob("components/*.py"),
             *ROOT.glob("tests/*.py"), *ROOT.glob("scripts/*.py"), ROOT / "app.py"]
    big = {str(f.relative_to(ROOT)): n for f in files if (n := len(f.read_text().splitlines())) > MAX_LINES}
    assert not big, f"modules over {MAX_LINES} lines: {big}"


def test_the_architecture_document_names_every_room():
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    for room, prefixes in ROOMS:
        assert room in text, room
        for prefix in prefixes:
            shown = prefix.replace("merging.", "").replace("merging", "merging/__init__")
            assert shown.split(".")[0] in text, (room, prefix)
