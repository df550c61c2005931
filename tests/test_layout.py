"""Architecture rules of STYLE.md, checked by parsing every module with ``ast``."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# package -> packages it must never import
FORBIDDEN = {
    "recvae": {"pipelines", "serving", "fastapi", "argparse", "uvicorn"},
    "pipelines": {"serving"},
    "serving": {"pipelines", "polars"},
}
# Optional integrations may import these only inside their own module.
OPTIONAL = {"mlflow": {"recvae/tracking.py"}, "implicit": {"recvae/baselines_implicit.py"}}


def _modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_imports_go_one_way(package: str) -> None:
    bad = []
    for path in _modules(package):
        wrong = _imports(path) & FORBIDDEN[package]
        if wrong:
            bad.append(f"{path.relative_to(ROOT)} imports {sorted(wrong)}")
    assert not bad, "\n".join(bad)


def test_optional_integrations_stay_in_their_module() -> None:
    bad = []
    for path in _modules("recvae"):
        rel = path.relative_to(ROOT).as_posix()
        for name, allowed in OPTIONAL.items():
            if name in _imports(path) and rel not in allowed:
                bad.append(f"{rel} imports {name}")
    assert not bad, "\n".join(bad)


def test_no_print_in_the_library() -> None:
    bad = []
    for path in _modules("recvae"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id == "print"
            ):
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not bad, bad


def test_core_imports_without_optional_packages() -> None:
    """The core must import with only torch, numpy, scipy and polars (GPU images lack the rest)."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in {'mlflow','implicit','fastapi','uvicorn','optuna',"
        "'tqdm','matplotlib'}:\n"
        "            raise ImportError('blocked ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import recvae.training, recvae.recommender, recvae.evaluation, recvae.split\n"
        "import recvae.data\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_cli_start_up_does_not_import_torch() -> None:
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from pipelines.cli import build_parser\n"
        "build_parser()\n"
        "heavy = [m for m in ('torch', 'mlflow', 'polars') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
