"""The layout of the robustness code: one package, its public names where the README and docs use them, nothing
importing the old ``mmsa_compat`` name, which still re-exports what it held."""

from __future__ import annotations

import ast
from pathlib import Path

import mmsa_emt
import mmsa_emt.robustness as robustness

PACKAGE = Path(mmsa_emt.__file__).parent


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports (relative imports resolved against the package)."""
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    package = parts[:-1]
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = list(package[:len(package) - node.level + 1]) if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def test_no_module_imports_the_old_adapter_name():
    users = [str(path.relative_to(PACKAGE.parent)) for path in PACKAGE.rglob("*.py")
             if path.name != "mmsa_compat.py" and "mmsa_emt.mmsa_compat" in imported_modules(path)]
    assert users == []


def test_the_robustness_code_is_one_package_with_its_public_names():
    assert Path(robustness.__file__).name == "__init__.py"
    assert not (PACKAGE / "robustness.py").exists() and not (PACKAGE / "executors.py").exists()
    assert not (PACKAGE / "mmsa" / "trials.py").exists()
    for name in robustness.__all__:
        assert getattr(robustness, name) is not None, name
    assert callable(robustness.sweep) and robustness.sweep.__module__ == "mmsa_emt.robustness.sweeps"
    assert robustness.run_missing_trial.__module__ == "mmsa_emt.robustness.trial"
    # the package's modules import nothing that knows MMSA but through mmsa_emt.mmsa (and MMSA's seeding)
    for path in (PACKAGE / "robustness").glob("*.py"):
        outside = {m for m in imported_modules(path) if m.startswith("MMSA")}
        assert outside <= {"MMSA.utils", "MMSA.utils.setup_seed"}, (path.name, outside)


def test_the_old_adapter_name_still_re_exports_what_it_held():
    from mmsa_emt import mmsa_compat
    from mmsa_emt.mmsa import config, data, models

    assert mmsa_compat.trial_args is config.trial_args and mmsa_compat.check_args is config.check_args
    assert mmsa_compat._at_missing_rates is data.at_missing_rates
    assert mmsa_compat.reads_incomplete_view is data.reads_incomplete_view
    assert mmsa_compat.display_name is models.display_name
    assert mmsa_compat.run_missing_trial is robustness.run_missing_trial
