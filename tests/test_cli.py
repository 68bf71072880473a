"""The command line explains itself: `qa-batch --help` names the commands, `--version`, the job's flags under
headings with short help, a bad combination of flags as one line, and docs/reference/cli.md current.

Subprocesses run the commands as a user would; none starts Ray or loads a model.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from jobs import cli
from jobs.config import GROUPS

ROOT = Path(__file__).resolve().parents[1]


def qa_batch(*args: str, module: str = "jobs.cli") -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "80"}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120, check=False)


def test_help_exits_0_and_says_what_each_command_does():
    result = qa_batch("--help")
    assert result.returncode == 0, result.stderr
    for name in cli.COMMANDS:
        assert re.search(rf"^  {name} +{re.escape(cli.SUMMARIES[name])}$", result.stdout, re.MULTILINE), name
    assert "--version" in result.stdout and result.stderr == ""
    bare = qa_batch()  # no command: the same help, as a usage error
    assert bare.returncode == 2 and bare.stderr == result.stdout


def test_version_on_qa_batch_and_its_commands():
    expected = f"qa-batch {cli.version()}\n"
    assert re.fullmatch(r"qa-batch \d+\.\d+\S*\n", expected)
    assert qa_batch("--version").stdout == expected
    assert qa_batch("answer", "--version").stdout == expected


def test_version_without_an_installed_distribution_is_pyprojects(monkeypatch):
    import importlib.metadata

    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", not_installed)
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert f'\nversion = "{cli.version()}"\n' in pyproject


def test_answer_help_groups_the_flags_with_short_help():
    result = qa_batch("--help", module="jobs.answer")  # as `qa-batch answer --help`
    assert result.returncode == 0, result.stderr
    headings = [line[:-1] for line in result.stdout.splitlines() if line[:-1] in GROUPS and line.endswith(":")]
    assert headings == list(GROUPS)
    assert "jobs.plan" not in result.stdout and "one output row per input row" in result.stdout
    # every flag's help, at 80 columns, is at most two lines (argparse puts a long flag's help on the next line)
    flags, lines = {}, result.stdout[result.stdout.index(f"\n{GROUPS[0]}:\n"):].splitlines()
    for line in lines:
        if line.startswith("  -"):
            flag = line.split()[0]
            flags[flag] = int(line[22:24] == "  " and line[24:25].strip() != "")  # its help starts here, or below
        elif line.startswith(" " * 24) and flags:
            flags[flag] += 1
    assert {"--input", "--precision", "--id-column", "--max-seq-len", "--verbose"} <= set(flags)
    assert {f: n for f, n in flags.items() if not 1 <= n <= 2} == {}


def test_a_bad_combination_is_one_line_and_exit_2():
    result = qa_batch("answer", "--input", "in", "--output", "out", "--wide")
    assert (result.returncode, result.stderr, result.stdout) == (2, "error: --wide needs --questions\n", "")


def run_in_process(capsys, args: list[str]) -> tuple[int, str, str]:
    """cli.main as the console script runs it; SystemExit's code as the exit status."""
    try:
        status = cli.main(args)
    except SystemExit as exit_:
        status = exit_.code
    out, err = capsys.readouterr()
    return status, out, err


@pytest.mark.parametrize("args, message", [
    (["answer", "--input", "in", "--output", "out", "--concurrency", "2", "--max-actors", "3"],
     "error: --concurrency (a fixed pool) excludes --min-actors and --max-actors"),
    (["answer", "--input", "in", "--output", "out", "--backend", "onnxruntime", "--precision", "bf16"],
     "error: precision bf16 runs on the OpenVINO backend"),
    (["evaluate", "--data", "dev.json", "--min-actors", "3", "--max-actors", "2"],
     "error: need 1 <= --min-actors <= --max-actors, got 3 and 2"),
])
def test_other_bad_combinations_are_one_line_too(capsys, args, message):
    status, out, err = run_in_process(capsys, args)
    assert (status, out) == (2, "") and len(err.splitlines()) == 1 and err.startswith(message), err


@pytest.mark.parametrize("args, start", [
    (["answer", "--input", "in", "--output", "out", "--no-such-flag"], "error: unrecognized arguments: --no-such-flag"),
    (["answer", "--output", "out"], "error: the following arguments are required: --input"),
    (["answer", "--input", "in", "--output", "out", "--top-k", "many"], "error: argument --top-k: invalid int"),
    (["no-such-command"], "error: unknown command 'no-such-command'"),
])
def test_a_usage_error_is_one_line_that_points_at_help(capsys, args, start):
    status, out, err = run_in_process(capsys, args)
    assert (status, out) == (2, "") and len(err.splitlines()) == 1, err
    assert err.startswith(start) and err.endswith("--help)\n"), err


def test_the_reference_page_is_current(monkeypatch, capsys):
    """docs/reference/cli.md is what `python -m jobs.reference` prints, from the parsers the commands use."""
    from jobs import answer, reference

    assert (ROOT / reference.PAGE).read_text() == reference.markdown(), \
        f"stale: regenerate with python -m jobs.reference > {reference.PAGE}"
    monkeypatch.setenv("COLUMNS", "100")
    with pytest.raises(SystemExit):
        answer.parse_args(["--help"])
    assert capsys.readouterr().out == reference.parsers()["answer"].format_help()
