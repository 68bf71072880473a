"""What `pip install .` installs: the product's packages (pipeline, jobs, models), not the lab tooling beside them
(benchmarks/, run from a clone), and nothing in the product imports that tooling."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import zipfile
from importlib.util import find_spec

import pytest
from conftest import REPO

PRODUCT = ("pipeline", "jobs", "models")
LAB = ("benchmarks", "jobs.benchmark")


def test_wheel_holds_the_product_and_not_the_benchmarks(tmp_path):
    """The wheel pip would install, built offline from a copy of the tree (a build in the repository would leave
    build/ there, whose stale files a later wheel may pick up)."""
    setuptools = pytest.importorskip("setuptools")
    version = tuple(int(part) for part in setuptools.__version__.split(".")[:2])
    if version < (68, 0) or (version < (70, 1) and find_spec("wheel") is None):
        pytest.skip(f"building offline needs pyproject's build backend here: setuptools>=68 (and wheel before 70.1), "
                    f"found setuptools {setuptools.__version__}")
    src = tmp_path / "src"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "out", "*.egg-info", "__pycache__", ".pytest_cache", ".hypothesis", "tests",
        "minilm-squad"))  # the model's weights: data, not a package, and large
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                           "--no-index", "-w", str(tmp_path / "wheel"), str(src)],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    (wheel,) = (tmp_path / "wheel").glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names if ".dist-info/" not in n} == set(PRODUCT)
    assert not [n for n in names if n.startswith(("benchmarks/", "jobs/benchmark/"))]
    # What the product runs itself stays in it: models.card --measure-shape runs models.fixed_batches.
    assert {"models/fixed_batches.py", "models/card.py", "jobs/cli.py"} <= set(names)
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "qa-batch = jobs.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_the_product_never_imports_the_lab_tooling():
    offenders = []
    for package in PRODUCT:
        for path in sorted((REPO / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                         [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
                offenders += [f"{path.relative_to(REPO)}:{node.lineno} {name}" for name in names
                              if name in LAB or name.startswith(tuple(f"{m}." for m in LAB))]
    assert not offenders


def test_qa_batch_benchmark_says_where_the_benchmark_went(capsys):
    from jobs.cli import COMMANDS, main

    assert "benchmark" not in COMMANDS
    assert main(["benchmark", "--data", "dev-v1.1.json"]) == 2
    err = capsys.readouterr().err
    assert "python -m benchmarks" in err and "clone" in err and len(err.strip().splitlines()) == 1
