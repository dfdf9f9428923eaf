"""The package's layering, read from the source with ``ast``: inference never imports the
trainer, the library never imports the command line, and no module-level import goes round in a
circle. A test here fails on the import that breaks the rule, naming its file and line."""

from __future__ import annotations

import ast
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

import reglm

PACKAGE = Path(reglm.__file__).parent

TRAINING = (
    "reglm.train",
    "reglm.cli.train",
    "reglm.cli.study",
    "reglm.cli.reproduce",
    "reglm.studies",
    "reglm.reproduce",
)
"""What trains (and may import ``reglm.train``): the trainer itself, the commands that start runs,
the studies and ``reglm reproduce``."""

STILL_IN_TRAIN = {
    ("reglm.cli.common", "reglm.train.checkpoint"): "--checkpoint state reads the trainer's resumable state.pt",
}
"""Imports of ``reglm.train`` outside :data:`TRAINING`, each a function-level import of a reading
the trainer owns, with the reason."""


@dataclass(frozen=True)
class Import:
    importer: str
    imported: str
    line: int
    level: str
    """``module`` (executed when the importer is imported), ``function`` (when a function runs)
    or ``type`` (under ``if TYPE_CHECKING:``, never executed)"""

    @property
    def module_level(self) -> bool:
        return self.level == "module"

    def __str__(self) -> str:
        return f"{self.importer} imports {self.imported} (line {self.line}, {self.level} level)"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _targets(node: ast.Import | ast.ImportFrom, importer: str) -> list[str]:
    """The reglm modules an import statement names (``from reglm.cli import data``: the module
    ``reglm.cli.data``; ``from reglm.cli.data import X``: ``reglm.cli.data``)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:
        package = importer if MODULES[importer].name == "__init__.py" else importer.rpartition(".")[0]
        for _ in range(node.level - 1):
            package = package.rpartition(".")[0]
        base = f"{package}.{base}" if base else package
    submodules = [f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in MODULES]
    return submodules or [base]


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports_of(importer: str) -> list[Import]:
    tree = ast.parse(MODULES[importer].read_text(encoding="utf-8"))
    found: list[Import] = []

    def walk(node: ast.AST, level: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                found.extend(
                    Import(importer, target, child.lineno, level)
                    for target in _targets(child, importer)
                    if target == "reglm" or target.startswith("reglm.")
                )
            elif isinstance(child, ast.If) and _is_type_checking(child):
                walk(child, "type")
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                walk(child, "function" if level == "module" else level)
            else:
                walk(child, level)

    walk(tree, "module")
    return found


IMPORTS = [imp for name in MODULES for imp in imports_of(name)]


def _under(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def test_the_walker_reads_module_and_function_level_imports() -> None:
    """The rules below rest on this reading: a known import of each level is found as such."""
    seen = {(i.importer, i.imported, i.level) for i in IMPORTS}
    assert ("reglm.api", "reglm.modeldir", "module") in seen
    assert ("reglm.cli.train", "reglm.train.run", "function") in seen
    assert ("reglm.evaluate.modes", "reglm.models", "type") in seen


def test_inference_never_imports_the_trainer() -> None:
    """Loading, scoring, serving, exporting and analysing a model need nothing of ``reglm.train``."""
    wrong = [
        str(imp)
        for imp in IMPORTS
        if _under(imp.imported, ("reglm.train",))
        and not _under(imp.importer, TRAINING)
        and (imp.importer, imp.imported) not in STILL_IN_TRAIN
    ]
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("pair", sorted(STILL_IN_TRAIN))
def test_each_remaining_import_of_the_trainer_is_a_function_level_one_that_exists(pair: tuple[str, str]) -> None:
    """An exception that no longer exists is removed from the list; the ones that do stay out of
    import time, so importing the importer loads nothing of the trainer."""
    found = [imp for imp in IMPORTS if (imp.importer, imp.imported) == pair]
    assert found, f"{pair} no longer imported: remove it from STILL_IN_TRAIN"
    assert not any(imp.module_level for imp in found), [str(imp) for imp in found]


def test_the_library_never_imports_the_command_line() -> None:
    wrong = [
        str(imp)
        for imp in IMPORTS
        if _under(imp.imported, ("reglm.cli",)) and not _under(imp.importer, ("reglm.cli", "reglm.__main__"))
    ]
    assert not wrong, "\n".join(wrong)


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (or a module importing itself),
    by Tarjan's algorithm."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(edges.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in edges.get(node, ()):
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def test_the_cycle_finder_finds_a_circle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def _graph(levels: tuple[str, ...]) -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {}
    for imp in IMPORTS:
        if imp.level in levels and imp.imported in MODULES and imp.importer != imp.imported:
            edges.setdefault(imp.importer, set()).add(imp.imported)
    return edges


def test_no_circle_among_module_level_imports() -> None:
    assert _cycles(_graph(("module",))) == []


def test_no_circle_through_imports_at_module_or_function_level() -> None:
    """Counting the imports inside functions too (not the type-only ones), every module depends
    on the others one way: configs, evaluation modes, the model, model directories and the API
    included (an evaluation mode is handed its reading by its caller). The package root is left
    out: its ``__getattr__`` imports :mod:`reglm.api` on first use of ``reglm.load``, and a module
    that reads ``reglm.__version__`` needs nothing more than the root, already imported."""
    edges = _graph(("module", "function"))
    edges.pop("reglm", None)
    assert _cycles(edges) == []


def test_every_component_family_lives_outside_the_trainer() -> None:
    """Building any run configuration imports every family's module (to find its kinds' configs),
    so none of them may be a module of ``reglm.train``."""
    from reglm.config.kinds import FAMILIES

    inside = {family: module for family, (module, _) in FAMILIES.items() if _under(module, ("reglm.train",))}
    assert not inside, inside


def test_loading_and_scoring_a_model_directory_imports_nothing_of_the_trainer(tmp_path: Path) -> None:
    """What the import reading above cannot see (the registries are imported by name): a fresh
    interpreter that builds a config, saves a model directory, loads it with ``reglm.load`` and
    scores a sentence has no module of ``reglm.train`` loaded."""
    code = f"""
import sys
import torch
import reglm
from reglm.config import build_config
from reglm.data.vocab import Vocab
from reglm.modeldir import save_model_dir
from reglm.models import LanguageModel

config = build_config("tiny", ["data.name=synthetic"])
vocab = Vocab(["<eos>", "<unk>", "the", "cat"], [0, 0, 3, 2])
torch.manual_seed(0)
save_model_dir({str(tmp_path / "model")!r}, LanguageModel(config.model, len(vocab), vocab), config, vocab)
lm = reglm.load({str(tmp_path / "model")!r}, device="cpu")
assert lm.perplexity("the cat") > 0
print(sorted(m for m in sys.modules if m == "reglm.train" or m.startswith("reglm.train.")))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
