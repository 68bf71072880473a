"""`qa-batch COMMAND ...`: one console script for the job entrypoints."""

from __future__ import annotations

import importlib
import sys

COMMANDS = {"answer": "jobs.answer", "evaluate": "jobs.evaluate"}
# Commands that left the package: what to run instead.
MOVED = {"benchmark": "the benchmark is lab tooling, not installed: run `python -m benchmarks ...` from the root "
                      "of a clone of the repository"}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in MOVED:
        print(f"qa-batch {argv[0]}: {MOVED[argv[0]]}", file=sys.stderr)
        return 2
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: qa-batch {{{','.join(COMMANDS)}}} ... (qa-batch COMMAND --help for its options)",
              file=sys.stderr)
        return 2
    return importlib.import_module(COMMANDS[argv[0]]).main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
