"""`qa-batch COMMAND ...`: one console script for the job entrypoints."""

from __future__ import annotations

import importlib
import sys

COMMANDS = {"answer": "jobs.answer", "evaluate": "jobs.evaluate", "benchmark": "jobs.benchmark"}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: qa-batch {{{','.join(COMMANDS)}}} ... (qa-batch COMMAND --help for its options)",
              file=sys.stderr)
        return 2
    return importlib.import_module(COMMANDS[argv[0]]).main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
