"""A missing optional dependency is one line naming the pip command: no traceback, a non-zero exit status.

The commands run in a subprocess whose PYTHONPATH starts with a `transformers` package that fails to import, as a
missing one does; torch, when it is not installed, is the first thing named instead.
"""

from __future__ import annotations

import os
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path

import pytest

from pipeline.extras import MissingExtraError, exits_on_missing_extra, pip_command, require

ROOT = Path(__file__).resolve().parents[1]
MISSING = "torch" if find_spec("torch") is None else "transformers"  # the first module each command needs


def run_without_transformers(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    blocker = tmp_path / "blocked" / "transformers"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text(
        'raise ModuleNotFoundError("No module named \'transformers\'", name="transformers")\n')
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(blocker.parent), str(ROOT)])}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
                          check=False)


def assert_one_pip_line(result: subprocess.CompletedProcess, line: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr + result.stdout
    assert result.stderr.splitlines() == [line], result.stderr


def test_convert_without_transformers_prints_the_pip_line(tmp_path):
    # A Hugging Face checkpoint as detect_source knows one; the missing tool is named before the weights are read.
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text('{"model_type": "bert", "vocab_size": 100}')
    (src / "model.safetensors").write_bytes(b"")
    result = run_without_transformers(tmp_path, "-m", "models.convert", str(src), str(tmp_path / "dst"))
    assert_one_pip_line(result, f'models.convert needs {MISSING}: pip install torch==2.13.0 -e ".[convert]"')
    assert not (tmp_path / "dst").exists()  # nothing half-written


@pytest.mark.parametrize("module, args", [
    ("models.train_qa", ["--workdir", "{tmp}/work", "--base", "{tmp}/base", "--train-file", "{tmp}/train.json"]),
    ("models.export_qa", ["--weights", "{tmp}/w.safetensors", "--dst", "{tmp}/dst", "--base", "{tmp}/base"]),
])
def test_training_commands_without_transformers_print_the_pip_line(tmp_path, module, args):
    result = run_without_transformers(tmp_path, "-m", module, *(a.format(tmp=tmp_path) for a in args))
    assert_one_pip_line(result, f'{module} needs {MISSING}: pip install torch==2.13.0 -e ".[train]"')
    assert not (tmp_path / "work").exists() and not (tmp_path / "dst").exists()


def test_require_returns_the_module_or_names_the_extra():
    import json

    assert require("json", "convert", "x") is json
    with pytest.raises(MissingExtraError) as err:
        require("no_such_module_qa_batch", "openvino", "--backend openvino")
    assert str(err.value) == '--backend openvino needs no_such_module_qa_batch: pip install -e ".[openvino]"'
    assert isinstance(err.value, ImportError) and err.value.name == "no_such_module_qa_batch"
    with pytest.raises(ValueError, match="unknown extra 'gpu'; known extras: convert, delta, iceberg, openvino, test, train"):
        pip_command("gpu")


def test_a_package_missing_its_own_dependency_names_it(tmp_path, monkeypatch):
    pkg = tmp_path / "half_installed_qa_batch"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("import no_such_dependency_qa_batch\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(MissingExtraError, match=r"^x needs half_installed_qa_batch \(no_such_dependency_qa_batch "
                                                r"is missing\): pip install"):
        require("half_installed_qa_batch", "train", "x")


def test_main_prints_the_line_and_exits_2(capsys):
    @exits_on_missing_extra
    def main() -> None:
        require("no_such_module_qa_batch", "train", "models.example")

    with pytest.raises(SystemExit) as exit_:
        main()
    assert exit_.value.code == 2
    assert capsys.readouterr().err == 'models.example needs no_such_module_qa_batch: pip install torch==2.13.0 -e ".[train]"\n'
