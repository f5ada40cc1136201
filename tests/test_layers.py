"""The package's layers, read off its tree: a module of capsdist imports only capsdist modules of its own layer or
a lower one, and no module starts a process (scripts are started by launch/ and the tests, never by the package),
but the one in STARTS_PROCESSES, for the reason given there.

Every import counts wherever it is written (in a function, under TYPE_CHECKING), and so does importlib.import_module
or __import__ of a constant name. A new folder or top-level module of capsdist needs a layer here.
"""

from __future__ import annotations

import ast
from pathlib import Path

from train_helpers import REPO

LAYERS = {"core": 0, "model": 1, "data": 1, "config": 2, "train": 3, "experiments": 4}
ROOT_LAYER = 0  # capsdist/__init__.py itself, which stays minimal (its version is read by data/shards.py)
NO_PROCESSES = {"subprocess", "runpy", "multiprocessing", "pty"}  # also torch.multiprocessing and the like
# the one module that starts a process, and why: not a script, the C compiler, once per machine and source
STARTS_PROCESSES = {"capsdist.model.fused_cpu": "builds the CPU routing kernels with the system's C compiler"}
OS_PROCESS_CALLS = ("system", "popen", "fork", "exec", "spawn", "posix_spawn")  # os.<name>* starts a process


def module_name(path: Path, root: Path) -> str:
    """capsdist/train/build.py -> capsdist.train.build; capsdist/core/__init__.py -> capsdist.core."""
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(name: str) -> int | None:
    """The layer of capsdist module `name` (None for a folder or module that LAYERS does not name)."""
    parts = name.split(".")
    return ROOT_LAYER if len(parts) == 1 else LAYERS.get(parts[1])


def imported(tree: ast.Module, name: str, is_package: bool, modules: set[str]) -> list[tuple[int, str]]:
    """(line, absolute module name) of everything module `name` imports; `from P import m` names P.m where that is
    one of `modules`, else P."""
    package = name if is_package else name.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:
                full = f"{base}.{alias.name}"
                found.append((node.lineno, full if full in modules else base))
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if called in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                found.append((node.lineno, node.args[0].value))
    return found


def os_process_calls(tree: ast.Module) -> list[tuple[int, str]]:
    """(line, "os.<name>") of every call of a function of os that starts a process."""
    return [
        (node.lineno, f"os.{node.func.attr}")
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and isinstance(node.func.value, ast.Name)
        and node.func.value.id == "os"
        and node.func.attr.startswith(OS_PROCESS_CALLS)
    ]


def violations(root: Path) -> list[str]:
    """Every import against the layers, and every process started, in the package at `root` (its folder)."""
    files = sorted(root.rglob("*.py"))
    modules = {module_name(path, root) for path in files}
    out = []
    for path in files:
        name = module_name(path, root)
        where = path.relative_to(root.parent)
        own = layer(name)
        if own is None:
            out.append(f"{where}: {name} has no layer (add it to LAYERS)")
            continue
        tree = ast.parse(path.read_text(), str(path))
        for line, target in imported(tree, name, path.name == "__init__.py", modules):
            parts = target.split(".")
            if NO_PROCESSES.intersection(parts) and name not in STARTS_PROCESSES:
                out.append(f"{where}:{line}: imports {target}, which starts processes")
            if parts[0] == root.name and (layer(target) is None or layer(target) > own):
                out.append(f"{where}:{line}: {name} (layer {own}) imports {target} (layer {layer(target)})")
        out += [f"{where}:{line}: calls {call}, which starts a process" for line, call in os_process_calls(tree)]
    return out


def test_capsdist_imports_only_its_own_layer_and_below_and_starts_no_process():
    root = REPO / "capsdist"
    assert len(list(root.rglob("*.py"))) > 40  # the checker reads the real tree
    assert violations(root) == []


def write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root / "capsdist"


def test_the_checker_flags_an_upward_import_and_a_started_process(tmp_path):
    package = write(
        tmp_path,
        {
            "capsdist/__init__.py": "",
            "capsdist/config.py": "from capsdist.core import files\nfrom capsdist.model import loss\n",
            "capsdist/core/__init__.py": "",
            "capsdist/core/files.py": "import os\nfrom . import errors\n\ndef f():\n    os.system('ls')\n",
            "capsdist/core/errors.py": "import capsdist\n",
            "capsdist/model/__init__.py": "from capsdist import config\n",  # a module named from its package
            "capsdist/model/loss.py": "def f():\n    from ..train import build\n",  # relative, in a function
            "capsdist/train/__init__.py": "",
            "capsdist/train/build.py": "import subprocess\nfrom capsdist.experiments import evaluate\n",
            "capsdist/experiments/__init__.py": "import importlib\nimportlib.import_module('torch.multiprocessing')\n",
            "capsdist/experiments/evaluate.py": "import capsdist.train.build\nfrom capsdist.core.errors import E\n",
            "capsdist/tools.py": "",
        },
    )
    assert violations(package) == [
        "capsdist/core/files.py:5: calls os.system, which starts a process",
        "capsdist/experiments/__init__.py:2: imports torch.multiprocessing, which starts processes",
        "capsdist/model/__init__.py:1: capsdist.model (layer 1) imports capsdist.config (layer 2)",
        "capsdist/model/loss.py:2: capsdist.model.loss (layer 1) imports capsdist.train.build (layer 3)",
        "capsdist/tools.py: capsdist.tools has no layer (add it to LAYERS)",
        "capsdist/train/build.py:1: imports subprocess, which starts processes",
        "capsdist/train/build.py:2: capsdist.train.build (layer 3) imports capsdist.experiments.evaluate (layer 4)",
    ]
