"""Imports point the way DESIGN.md says: the import-linter contracts in pyproject.toml hold.

The contracts: the layers (cli -> stages -> train -> evaluate -> loading/generate -> generation/hf ->
models/data -> core) with models, data, prompts and text metrics independent of each other, and
no module below the CLI importing argparse. The second test shows the check can fail: a copy of
the package with the core importing the models breaks it.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _lint_imports(package_root: Path) -> subprocess.CompletedProcess:
    """Run lint-imports on the package found under ``package_root`` with this repository's contracts."""
    command = [sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; "
               "sys.exit(lint_imports_command())", "--no-cache", str(REPO / "pyproject.toml")]
    env = {**os.environ, "PYTHONPATH": str(package_root)}
    return subprocess.run(command, cwd=package_root, env=env, capture_output=True, text=True, timeout=300)


def test_import_contracts_hold():
    result = _lint_imports(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Contracts: 2 kept, 0 broken." in result.stdout


def test_core_importing_the_models_breaks_the_layers(tmp_path):
    shutil.copytree(REPO / "llmjax", tmp_path / "llmjax", ignore=shutil.ignore_patterns("__pycache__"))
    config = tmp_path / "llmjax" / "config.py"
    config.write_text(config.read_text() + "\nfrom llmjax.models import MODEL_CONFIGS  # noqa: E402,F811\n")
    result = _lint_imports(tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Layers: imports point down only BROKEN" in result.stdout
    assert "llmjax.config -> llmjax.models" in result.stdout
