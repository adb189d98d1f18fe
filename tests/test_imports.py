"""Imports run one way: a cycle between the library's packages, or the library importing
its program (albef_ds.cli) or data_tools, fails here. Every import counts, also those
inside functions (a lazy import hides a cycle from Python, not from the reader)."""
import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
#: the library's packages and top-level modules are nodes; albef_ds.cli is the program on top
PROGRAMS = {"albef_ds.cli", "albef_ds.__main__"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> set[str]:
    """Absolute names of every module ``path`` imports (relative imports resolved)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            out.add(target)
            out.update(f"{target}.{a.name}" for a in node.names)  # `from . import losses`
    return out


def node_of(module: str) -> str | None:
    """albef_ds.train.trainer -> albef_ds.train; albef_ds.losses -> albef_ds.losses."""
    parts = module.split(".")
    if parts[0] == "data_tools":
        return "data_tools"
    if parts[0] != "albef_ds" or len(parts) < 2:
        return None
    candidate = REPO.joinpath(*parts[:2])
    if candidate.is_dir() or candidate.with_suffix(".py").is_file():
        return ".".join(parts[:2])
    return None


def package_graph(root: str = "albef_ds") -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in sorted((REPO / root).rglob("*.py")):
        src = node_of(module_name(path))
        if src is None:
            continue
        graph.setdefault(src, set())
        for target in imports_of(path):
            dst = node_of(target)
            if dst is not None and dst != src:
                graph[src].add(dst)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
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

    for v in list(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle_between_the_library_packages():
    assert cycles(package_graph()) == []


def test_the_library_imports_neither_its_program_nor_data_tools():
    graph = package_graph()
    forbidden = {"albef_ds.cli", "data_tools"}
    offenders = {src: sorted(dst & forbidden) for src, dst in graph.items()
                 if src not in PROGRAMS and dst & forbidden}
    assert offenders == {}


def test_imports_run_one_way_models_objectives_train():
    graph = package_graph()
    assert "albef_ds.train" not in graph["albef_ds.models"] | graph["albef_ds.objectives"]
    assert "albef_ds.objectives" not in graph["albef_ds.models"]
    assert "albef_ds.train" not in graph["albef_ds.eval"] and "albef_ds.train" not in graph["albef_ds.data"]


def test_the_checker_finds_a_cycle_and_a_program_import():
    """The checker itself: a planted cycle and a library module importing the CLI are caught."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    graph = package_graph()
    graph["albef_ds.models"].add("albef_ds.train")
    assert any("albef_ds.models" in c and "albef_ds.train" in c for c in cycles(graph))


def test_relative_imports_are_resolved():
    assert "albef_ds.train.trainer" in imports_of(REPO / "albef_ds" / "cli" / "pretrain.py")  # from ..train.trainer
    assert "albef_ds.objectives.itc" in imports_of(REPO / "albef_ds" / "objectives" / "pretrain.py")  # from . import itc


def _uses_sys_path(path: Path) -> bool:
    return any(isinstance(n, ast.Attribute) and n.attr == "path" and isinstance(n.value, ast.Name)
               and n.value.id == "sys" for n in ast.walk(ast.parse(path.read_text(), str(path))))


def test_test_modules_import_only_the_support_package_and_never_touch_sys_path():
    """Helpers live in tests/support; a test module imported by another (its fixtures and
    module-level state run twice, under two names) or a ``sys.path`` edit fails here."""
    offenders = []
    for path in sorted((REPO / "tests").rglob("*.py")):
        if "support" in path.relative_to(REPO / "tests").parts:
            continue
        for target in imports_of(path):
            if target.startswith("tests.") and not target.startswith("tests.support") or \
                    target.split(".")[0].startswith("test_"):
                offenders.append(f"{path.relative_to(REPO)} imports {target}")
        if _uses_sys_path(path):
            offenders.append(f"{path.relative_to(REPO)} edits sys.path")
    for path in sorted((REPO / "tests" / "support").rglob("*.py")):
        if _uses_sys_path(path) or any(t.split(".")[-1].startswith("test_") for t in imports_of(path)):
            offenders.append(f"{path.relative_to(REPO)} imports a test module or edits sys.path")
    assert not offenders, "\n".join(offenders)


#: engine library -> the one file allowed to import it (albef_ds/train/engines/base.py)
ENGINE_LIBRARIES = {
    "deepspeed": {"albef_ds/train/engines/deepspeed.py"},
    "torch.distributed.fsdp": {"albef_ds/train/engines/fsdp2.py"},
    "torch.distributed.checkpoint": {"albef_ds/train/engines/fsdp2.py"},
}


def engine_library_imports(root: str = "albef_ds") -> dict[str, set[str]]:
    """Engine library -> the library files that import it (lazy imports counted)."""
    found: dict[str, set[str]] = {lib: set() for lib in ENGINE_LIBRARIES}
    for path in sorted((REPO / root).rglob("*.py")):
        for target in imports_of(path):
            for lib in ENGINE_LIBRARIES:
                if target == lib or target.startswith(lib + "."):
                    found[lib].add(path.relative_to(REPO).as_posix())
    return found


def test_only_an_engine_file_imports_its_library():
    """DeepSpeed is imported by the DeepSpeed engine only; FSDP and DCP by the FSDP2 one:
    the rest of the library reaches an engine through albef_ds/train/engines/base.py."""
    offenders = {lib: sorted(files - ENGINE_LIBRARIES[lib]) for lib, files in engine_library_imports().items()}
    assert {lib: files for lib, files in offenders.items() if files} == {}
    assert engine_library_imports()["deepspeed"] == {"albef_ds/train/engines/deepspeed.py"}


def test_the_engine_fitness_check_sees_a_lazy_import(tmp_path):
    """The scan counts an import inside a function, as the engines write them."""
    path = REPO / "albef_ds" / "train" / "trainer.py"
    assert "deepspeed" not in {t.split(".")[0] for t in imports_of(path)}
    assert "deepspeed" in imports_of(REPO / "albef_ds" / "train" / "engines" / "deepspeed.py")
