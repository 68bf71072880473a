"""`qa-batch COMMAND ...`: one console script for the job's commands, and what their parsers share: --version, and a
usage error or a bad combination of flags as one line on stderr (exit status 2)."""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import re
import sys
from pathlib import Path
from typing import NoReturn

PROG = "qa-batch"
COMMANDS = {"answer": "jobs.answer", "evaluate": "jobs.evaluate"}
# What each command does, in one line (qa-batch --help, docs/reference/cli.md).
SUMMARIES = {
    "answer": "answer every question of a table: one output row per input row, committed once",
    "evaluate": "score a model on a SQuAD-format file (exact match, F1) by running the same job on it",
}
# Commands that left the package: what to run instead.
MOVED = {"benchmark": "the benchmark is lab tooling, not installed: run `python -m benchmarks ...` from the root "
                      "of a clone of the repository"}
ABOUT = ("Batch extractive question answering over tables (Parquet, Iceberg, Delta Lake), on one machine or a Ray "
         "cluster.")

ANSWER = """\
Answer every question of a table with an extractive QA model, on this machine or a Ray cluster.

Reads each input row's id, question and context columns (--id-column, --question-column and --context-column
name others) and writes one output row per input row: its columns, then answer, answer_start, answer_end,
score, probability and error. A row that cannot be answered gets its error and no answer; the job goes on.
The output (Parquet files and _manifest.json, or one commit of a lake table) is committed once, complete.

Starts a local Ray unless one is running or --address (or RAY_ADDRESS) names a cluster, as under `ray job submit`.

--mode says what to do with an existing output: error refuses it, overwrite replaces it, resume finishes an
interrupted run, and refresh answers only the rows whose question or context changed, keeping every other
answer (the nightly mode). --questions asks every question of that file of every input row (fan-out).

example:

    qa-batch answer --input questions.parquet --output answers/
"""
ANSWER_USAGE = "%(prog)s --input INPUT --output OUTPUT [flags]"


def version() -> str:
    """The installed distribution's version; a source tree that is not installed: pyproject.toml's."""
    try:
        return importlib.metadata.version(PROG)
    except importlib.metadata.PackageNotFoundError:
        pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
        text = pyproject.read_text() if pyproject.is_file() else ""
        found = re.search(r'^version\s*=\s*"([^"]+)"', text, re.MULTILINE)
        return found.group(1) if found else "unknown"


class ArgumentParser(argparse.ArgumentParser):
    """A command's parser: ``--version``, and errors as one line on stderr with exit status 2, not the usage."""

    def error(self, message: str) -> NoReturn:
        """argparse's own errors: an unknown flag, a missing or malformed value."""
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")

    def refuse(self, message: str) -> NoReturn:
        """A combination of valid flags the config refuses (its ValueError says what is wrong)."""
        self.exit(2, f"error: {message}\n")


def command_parser(command: str, description: str, usage: str | None = None) -> ArgumentParser:
    p = ArgumentParser(prog=f"{PROG} {command}", description=description, usage=usage,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"{PROG} {version()}",
                   help="show the version and exit")
    return p


def answer_parser() -> ArgumentParser:
    """``qa-batch answer``'s parser, before its flags (jobs.answer.parse_args adds JobConfig's)."""
    return command_parser("answer", ANSWER, ANSWER_USAGE)


def help_text() -> str:
    options = {"-h, --help": "show this help and exit", "--version": "show the version and exit"}
    width = max(map(len, [*COMMANDS, *options])) + 2
    commands = "".join(f"  {name:<{width}}{SUMMARIES[name]}\n" for name in COMMANDS)
    flags = "".join(f"  {name:<{width}}{what}\n" for name, what in options.items())
    return (f"usage: {PROG} COMMAND [flags]\n\n{ABOUT}\n\ncommands:\n{commands}\noptions:\n{flags}\n"
            f"`{PROG} COMMAND --help` lists a command's flags.\n")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print(help_text(), end="", file=sys.stderr)
        return 2
    first = argv[0]
    if first in ("-h", "--help"):
        print(help_text(), end="")
        return 0
    if first == "--version":
        print(f"{PROG} {version()}")
        return 0
    if first in MOVED:
        print(f"{PROG} {first}: {MOVED[first]}", file=sys.stderr)
        return 2
    if first not in COMMANDS:
        what = "flag" if first.startswith("-") else "command"
        print(f"error: unknown {what} {first!r}; commands: {', '.join(COMMANDS)} (see {PROG} --help)",
              file=sys.stderr)
        return 2
    return importlib.import_module(COMMANDS[first]).main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
