"""The package layering, read from the source with `ast` (nothing is imported): every dpunet module imports only
from its own package or from packages below it, and no command-line module is imported by another module."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "dpunet"

# lowest first; a package may import from its own layer's packages only where the pair is listed in SAME_LAYER_OK
LAYERS: list[set[str]] = [
    {"", "utils"},  # "" is dpunet/__init__.py (the version; the API is attached lazily)
    {"paths"},
    {"privacy", "dataset"},
    {"preprocessing"},
    {"fingerprint"},
    {"planning"},
    {"architectures", "learning"},  # learning: loss, optimiser schedule, checkpoint files
    {"release"},  # the released model file rebuilds the network, so it sits above architectures
    {"evaluation"},  # metrics and run summaries: validation during training uses them
    {"inference"},
    {"pretraining"},
    {"training"},  # training calls pretraining for its initial weights, never the reverse
    {"api"},  # dpunet.api: plan_and_preprocess, train, predict, evaluate; the commands call it
    {"audit", "benchmark", "study", "demo", "pipeline", "tuning"},  # tuning: dpunet_tune_public
]
SAME_LAYER_OK: set[tuple[str, str]] = set()


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


MODULES = _modules()


def _resolve(name: str) -> str:
    """The longest prefix of `name` that is a module (`from a.b import c` names module a.b.c or a name in a.b)."""
    parts = name.split(".")
    while parts and ".".join(parts) not in MODULES:
        parts = parts[:-1]
    return ".".join(parts) or name


def imports_of(module: str) -> list[tuple[str, int]]:
    """(imported dpunet module, line) for every import statement of `module`, including those inside functions."""
    path = MODULES[module]
    tree = ast.parse(path.read_text(), filename=str(path))
    package_parts = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(_resolve(a.name), node.lineno) for a in node.names if a.name.split(".")[0] == "dpunet"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package_parts[:len(package_parts) - (node.level - 1)]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            if name.split(".")[0] != "dpunet":
                continue
            found += [(_resolve(f"{name}.{a.name}"), node.lineno) for a in node.names]
    return found


def package_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def layer_of(package: str) -> int:
    for i, layer in enumerate(LAYERS):
        if package in layer:
            return i
    raise AssertionError(f"package dpunet.{package} has no layer: add it to LAYERS in tests/test_structure.py")


def is_cli(module: str) -> bool:
    return module.endswith(".cli")


def console_entry_modules() -> set[str]:
    """Modules named by setup.py's console_scripts (they may reuse other commands' argument definitions)."""
    text = (REPO / "setup.py").read_text()
    return set(re.findall(r'"[\w-]+=(dpunet[\w.]*):\w+"', text))


def test_the_import_reader_sees_relative_absolute_and_function_level_imports():
    # an oracle written by hand for modules whose imports are known
    assert ("dpunet.learning.checkpoint", ) == tuple(m for m, _ in imports_of("dpunet.training.initialisation")
                                                    if m.startswith("dpunet.learning"))
    assert any(m == "dpunet.training.trainer" for m, _ in imports_of("dpunet.architectures.cli"))  # inside a function
    assert _resolve("dpunet.release.write_release") == "dpunet.release"
    assert _resolve("dpunet.planning.plans.load_plans") == "dpunet.planning.plans"


def test_every_package_has_a_layer():
    for module in MODULES:
        if module.startswith("dpunet"):
            layer_of(package_of(module))


def test_command_line_modules_are_imported_by_no_other_module():
    entries = console_entry_modules()
    assert "dpunet.training.cli" in entries and "dpunet.pipeline.cli" in entries
    offenders = [f"{importer}:{line} imports {target}" for importer in MODULES if importer not in entries
                 for target, line in imports_of(importer) if is_cli(target) and target != importer]
    assert not offenders, "command-line modules must be leaves:\n" + "\n".join(offenders)
    # entry points may combine other commands' options, but a *.cli module never needs another one
    cli_to_cli = [f"{importer}:{line} imports {target}" for importer in MODULES if is_cli(importer)
                  for target, line in imports_of(importer) if is_cli(target) and target != importer]
    assert not cli_to_cli, "\n".join(cli_to_cli)


def test_no_package_imports_from_a_package_above_it():
    upward = []
    for importer in MODULES:
        if is_cli(importer):
            continue  # commands are the top of every package: they may use anything, and nothing uses them
        src = package_of(importer)
        for target, line in imports_of(importer):
            dst = package_of(target)
            if dst == src:
                continue
            if layer_of(dst) > layer_of(src) or (layer_of(dst) == layer_of(src) and (src, dst) not in SAME_LAYER_OK):
                upward.append(f"{importer}:{line} (dpunet.{src}) imports {target} (dpunet.{dst})")
    assert not upward, "imports against the layering " + " < ".join("/".join(sorted(x)) for x in LAYERS) + ":\n" + \
        "\n".join(upward)


@pytest.mark.parametrize("importer, forbidden", [
    ("dpunet.inference", "dpunet.training"),  # the model is loaded from its release file (dpunet.release)
    ("dpunet.planning", "dpunet.training"),  # augmentation defaults live in dpunet.planning.augmentation
    ("dpunet.pretraining", "dpunet.training"),  # shared pieces live in dpunet.learning
])
def test_the_debts_of_issue_14_stay_paid(importer, forbidden):
    bad = [f"{m}:{line} -> {t}" for m in MODULES if m.startswith(importer + ".") or m == importer
           for t, line in imports_of(m) if t.startswith(forbidden + ".") or t == forbidden]
    assert not bad, "\n".join(bad)


def test_setup_entry_points_name_existing_modules():
    for module in console_entry_modules():
        assert module in MODULES, module
