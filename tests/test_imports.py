"""The package's floors: errors, io, data, tokenizer, distributed and autocast at the ground; then `mixret.models`,
`mixret.retrieval`, `mixret.training`; then the applications (cli, serve, quickstart). A module imports only from
its own floor or the floors below, there is no import circle (deferred imports included), siblings are imported by
their module path rather than through their floor's __init__, and at most MAX_DEFERRED imports of the package's
own modules sit inside functions, each with a `# deferred:` reason on its line."""
import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "mixret"
MAX_DEFERRED = 15
GROUND = ("errors", "io", "data", "tokenizer", "distributed", "autocast", "version", "options")
FLOORS = {"ground": 0, "models": 1, "retrieval": 2, "training": 3, "apps": 4}
APPS = ("cli", "serve", "quickstart")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def floor(module: str) -> int:
    parts = module.split(".")
    if len(parts) == 1:
        return -1  # the package's own __init__: above nothing, imported by nobody inside
    if parts[1] in ("models", "retrieval", "training"):
        return FLOORS[parts[1]]
    if parts[1] in GROUND:
        return FLOORS["ground"]
    if parts[1] in APPS:
        return FLOORS["apps"]
    raise AssertionError(f"{module}: a module on no floor; add it to a floor in tests/test_imports.py")


def imports(module: str) -> list[tuple[str, int, bool, str]]:
    """(imported module, line, deferred?, source line) for each import of a package module in `module`."""
    path = MODULES[module]
    source = path.read_text()
    lines = source.splitlines()
    tree = ast.parse(source)
    top = {id(node) for node in tree.body}
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
            # `from mixret.x import y` names the module mixret.x.y when there is one
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        for target in dict.fromkeys(targets):
            if target == "mixret" or target.startswith("mixret."):
                found.append((target, node.lineno, id(node) not in top, lines[node.lineno - 1]))
    return found


GRAPH = {m: imports(m) for m in MODULES}


def test_every_module_imports_only_from_its_floor_or_below():
    climbs = [f"{m}:{line} imports {t}" for m, edges in GRAPH.items() if m != "mixret"
              for t, line, _, _ in edges if floor(t) > floor(m) or t == "mixret"]
    assert not climbs, "imports that climb a floor:\n" + "\n".join(climbs)


def test_siblings_are_imported_by_their_module_path():
    through_init = [f"{m}:{line} imports {t}" for m, edges in GRAPH.items() for t, line, _, _ in edges
                    if t in ("mixret.models", "mixret.retrieval", "mixret.training") and m.startswith(t + ".")]
    assert not through_init, "\n".join(through_init)


def test_there_is_no_import_circle():
    graph = {m: {t for t, *_ in edges if t in MODULES and t != m} for m, edges in GRAPH.items()}
    # a package's __init__ runs before its modules: an edge into a package is an edge into its __init__ only
    state, stack, circles = {}, [], []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == "open":
                circles.append(" -> ".join(stack[stack.index(t):] + [t]))
            elif t not in state:
                visit(t)
        stack.pop()
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert not circles, "import circles:\n" + "\n".join(circles)


def test_few_deferred_imports_each_with_its_reason():
    deferred = [(m, line, text) for m, edges in GRAPH.items() for _, line, d, text in edges if d]
    assert len(deferred) <= MAX_DEFERRED, f"{len(deferred)} deferred imports of package modules (at most " \
        f"{MAX_DEFERRED}):\n" + "\n".join(f"{m}:{line}" for m, line, _ in deferred)
    unexplained = [f"{m}:{line}" for m, line, text in deferred if "# deferred:" not in text]
    assert not unexplained, "deferred imports without a `# deferred: reason`:\n" + "\n".join(unexplained)


def test_the_command_line_imports_in_a_fresh_interpreter():
    """`mixret.cli` imports every floor: in a fresh interpreter no circle hides behind an import order."""
    proc = subprocess.run([sys.executable, "-c", "import mixret.cli"], capture_output=True, text=True,
                          cwd=PACKAGE.parent)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_every_floor_is_a_regular_package():
    """A folder of modules without __init__.py is a namespace package, which a built wheel leaves out."""
    missing = [str(d) for d in {p.parent for p in PACKAGE.rglob("*.py")} if not (d / "__init__.py").is_file()]
    assert not missing, missing
