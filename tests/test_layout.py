"""The package tree shows the data flow: no import cycles, and no stage imports a later one."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "glmvoice_cli"

# The order audio travels; a module may import its own stage or an earlier one, never a later one.
# Shared leaves (config, errors, options, device, events, models/) sit below every stage.
STAGES = ["audio", "tokenizer", "lm", "decoder", "sessions", "pipeline", "chat", "serve", "ui", "commands"]
LEAVES = {"config", "errors", "options", "device", "events", "models", "memory", "__init__"}


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """Every glmvoice_cli module this file imports, at any depth in the file (lazy imports count)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            if name in modules and name != "glmvoice_cli":
                found.add(name)
    return found


def _stage(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def test_no_import_cycles() -> None:
    modules = _modules()
    graph = {m: _imports(p, modules) - {m} for m, p in modules.items()}
    done: set[str] = set()

    def visit(node: str, stack: list[str]) -> None:
        if node in stack:
            pytest.fail("import cycle: " + " -> ".join([*stack[stack.index(node):], node]))
        if node in done:
            return
        for nxt in graph.get(node, ()):
            if not nxt.startswith(node + "."):  # a package importing its own submodule is no cycle
                visit(nxt, [*stack, node])
        done.add(node)

    for module in graph:
        visit(module, [])


def test_no_stage_imports_a_later_stage() -> None:
    modules = _modules()
    for module, path in modules.items():
        stage = _stage(module)
        if stage not in STAGES:
            continue
        for target in _imports(path, modules):
            other = _stage(target)
            if other in STAGES:
                assert STAGES.index(other) <= STAGES.index(stage), f"{module} imports the later {target}"
            assert other != "cli", f"{module} imports the CLI"


def test_cli_import_is_light() -> None:
    code = ("import sys, glmvoice_cli.cli\n"
            "heavy = [m for m in ('torch', 'transformers', 'sounddevice') if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_public_api_from_the_package_root() -> None:
    import glmvoice_cli

    for name in glmvoice_cli.__all__:
        assert getattr(glmvoice_cli, name) is not None, name


MODEL_STAGES = ("audio", "tokenizer", "lm", "decoder")  # each testable alone: none imports another
ABOVE_THE_STAGES = ("pipeline", "chat", "commands", "cli", "doctor", "selftest")


def test_model_stages_import_no_other_stage_and_nothing_above_them() -> None:
    modules = _modules()
    for module, path in modules.items():
        stage = _stage(module)
        if stage not in MODEL_STAGES:
            continue
        for target in _imports(path, modules):
            other = _stage(target)
            assert other not in ABOVE_THE_STAGES, f"{module} imports {target}, above the stages"
            assert other not in MODEL_STAGES or other == stage, f"{module} imports the stage {target}"


def test_only_the_cli_imports_the_commands() -> None:
    """The arrows point down: nothing but the CLI's entry points reaches into `commands/` or `cli`."""
    modules = _modules()
    entry = {"glmvoice_cli.cli", "glmvoice_cli.__main__", "glmvoice_cli.entry"}
    for module, path in modules.items():
        if module in entry or _stage(module) == "commands":
            continue
        for target in _imports(path, modules):
            assert _stage(target) not in ("commands", "cli"), f"{module} imports {target}"


def test_the_conversation_reaches_the_models_only_through_the_pipeline() -> None:
    """`chat/` (the core, the worker, the local transport), `serve/`, `ui/` and `sessions/` never import a model stage:
    the pipeline is the one user of the LM, its Conversation and the speech stages."""
    modules = _modules()
    for module, path in modules.items():
        if _stage(module) not in ("chat", "serve", "ui", "sessions"):
            continue
        for target in _imports(path, modules):
            assert _stage(target) not in ("tokenizer", "lm", "decoder"), f"{module} imports {target}"
