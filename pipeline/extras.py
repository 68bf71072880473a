"""Optional dependencies (the extras in pyproject.toml): a missing one is one line naming the pip command.

A command that needs an extra imports it through ``require`` and wraps its ``main`` in ``exits_on_missing_extra``:

    from pipeline.extras import exits_on_missing_extra, require

    def convert(...):
        torch = require("torch", "convert", "models.convert")
        ...

    @exits_on_missing_extra
    def main(argv=None): ...

Without torch, ``python -m models.convert SRC DST`` then prints, to stderr and without a traceback,

    models.convert needs torch: pip install torch==2.13.0 -e ".[convert]"

and exits with status 2. Library callers get a ``MissingExtraError`` (an ``ImportError``) with that line as its
message, so ``except ImportError`` and ``pytest.importorskip``-style checks keep working.
"""

from __future__ import annotations

import functools
import importlib
import sys
from collections.abc import Callable
from types import ModuleType
from typing import TypeVar

# The torch pin is the CPU build served from disk here; a plain `torch` pulls a multi-GB CUDA build.
PIP_COMMANDS = {
    "train": 'pip install torch==2.13.0 -e ".[train]"',
    "convert": 'pip install torch==2.13.0 -e ".[convert]"',
    "openvino": 'pip install -e ".[openvino]"',
    "iceberg": 'pip install -e ".[iceberg]"',
    "delta": 'pip install -e ".[delta]"',
    "test": 'pip install -e ".[test]"',
}
EXIT_MISSING_EXTRA = 2  # what argparse uses for a command that cannot run as given

F = TypeVar("F", bound=Callable)


class MissingExtraError(ImportError):
    """An optional dependency is not installed; ``str()`` is the one line to show (what needs it, pip command)."""


def pip_command(extra: str) -> str:
    """The command that installs ``extra`` (a key of pyproject.toml's optional-dependencies)."""
    if extra not in PIP_COMMANDS:
        raise ValueError(f"unknown extra {extra!r}; known extras: {', '.join(sorted(PIP_COMMANDS))}")
    return PIP_COMMANDS[extra]


def require(module: str, extra: str, what: str) -> ModuleType:
    """Import ``module`` (e.g. "transformers") or raise MissingExtraError naming ``what`` needs it and how to get it.

    ``extra`` is the pyproject extra that installs it; ``what`` is who is asking, as a user would type it
    ("models.convert", "--backend openvino").
    """
    command = pip_command(extra)  # an unknown extra is our bug: say so even when the import works
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        # An installed package whose own dependency is missing names that one: show it, it is what to install.
        inner = f" ({exc.name} is missing)" if exc.name and exc.name.split(".")[0] != module.split(".")[0] else ""
        raise MissingExtraError(f"{what} needs {module}{inner}: {command}", name=module) from exc


def exits_on_missing_extra(main: F) -> F:
    """Decorate a command's ``main``: a MissingExtraError becomes its line on stderr and exit status 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except MissingExtraError as exc:
            print(exc, file=sys.stderr)
            raise SystemExit(EXIT_MISSING_EXTRA) from None

    return wrapper  # type: ignore[return-value]
