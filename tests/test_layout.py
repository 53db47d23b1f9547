"""The house rules of the code base, checked on the source: one-way arrows between the packages,
no import circle, no Prefect in the library, a model side that runs on a bare GPU machine."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PRCORE = REPO / "prcore"

# store -> data -> method / outputs -> quality (and the toy world) -> pipeline -> cli, never back
RANK = {"store": 0, "data": 1, "method": 2, "outputs": 2, "quality": 3, "toyworld": 3, "pipeline": 4, "cli": 5}
MODEL_SIDE_FORBIDDEN = ("polars", "boto3", "botocore", "prefect", "pydantic", "pyarrow")


def module_name(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports(path: Path) -> list[tuple[str, bool]]:
    """(imported module, at module level?) for every import statement in ``path``."""
    tree = ast.parse(path.read_text())
    top = {id(n) for n in tree.body}
    here = module_name(path)
    package = here if path.name == "__init__.py" else here.rsplit(".", 1)[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, id(node) in top) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            names = [f"{base}.{a.name}" for a in node.names]
            out += [(n, id(node) in top) for n in names] + [(base, id(node) in top)]
    return out


MODULES = sorted(p for p in PRCORE.rglob("*.py"))
KNOWN = {module_name(p) for p in MODULES}


def prcore_edges(path: Path, *, module_level_only: bool = False) -> set[str]:
    found = set()
    for name, top in imports(path):
        if module_level_only and not top:
            continue
        while name and name not in KNOWN:
            name = name.rsplit(".", 1)[0] if "." in name else ""
        if name and name != module_name(path) and name.startswith("prcore."):
            found.add(name)
    return found


def package_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in RANK) else None


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.relative_to(REPO).as_posix())
def test_arrows_point_one_way(path):
    here = package_of(module_name(path))
    if here is None:
        return
    for target in prcore_edges(path):
        there = package_of(target)
        if there is None or there == here:
            continue
        assert RANK[there] < RANK[here], f"{module_name(path)} imports {target}: {here} may not depend on {there}"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.relative_to(REPO).as_posix())
def test_prefect_only_in_the_cli_and_model_side_bare(path):
    mod = module_name(path)
    names = [n for n, _ in imports(path)]
    if not mod.startswith("prcore.cli"):
        assert not [n for n in names if n.split(".")[0] in ("prefect", "flows", "tasks")], f"{mod} imports Prefect/flows/tasks"
    if mod.startswith("prcore.method") or mod in ("prcore.store.keys", "prcore.data.schema", "prcore.data.fingerprint", "prcore.data.images"):
        bad = [n for n in names if n.split(".")[0] in MODEL_SIDE_FORBIDDEN]
        assert not bad, f"{mod} (model side) imports {bad}: it must run on a bare GPU machine"
        for target in prcore_edges(path):  # and so does everything it imports from prcore
            assert target.startswith(("prcore.method", "prcore.store.keys", "prcore.data.schema", "prcore.data.fingerprint",
                                      "prcore.data.images", "prcore.data.model_source")), f"{mod} (model side) imports {target}"


def test_no_import_circle():
    graph = {module_name(p): prcore_edges(p) for p in MODULES}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt.startswith(node + ".") or node.startswith(nxt + "."):
                continue  # a package and its own modules
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                raise AssertionError("import circle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


# Where a model's parts may be named: its family (prcore/method/families/), the published architectures and the
# model builders, the single-file key layout (model_source.py: key strings of checkpoint files), and the toy world's
# own small network. Everything else asks the pipeline's family.
FAMILY_SEAM_EXEMPT = ("prcore/method/families/", "prcore/method/architectures.py", "prcore/method/tiny.py",
                      "prcore/method/full_size.py", "prcore/data/model_source.py", "prcore/toyworld/")
MODEL_PART = re.compile(r"\.(unet|transformer)\b|\b[A-Za-z]+Scheduler\b|UNet2DConditionModel|SD3Transformer2DModel")


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.relative_to(REPO).as_posix())
def test_only_the_families_name_a_denoiser_or_a_scheduler(path):
    rel = path.relative_to(REPO).as_posix()
    if rel.startswith(FAMILY_SEAM_EXEMPT):
        return
    hits = [f"{i}: {line.strip()}" for i, line in enumerate(path.read_text().splitlines(), 1) if MODEL_PART.search(line)]
    assert not hits, f"{rel} names a model part; ask prcore.method.families instead:\n" + "\n".join(hits)
