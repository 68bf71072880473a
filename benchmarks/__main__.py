"""python -m benchmarks: see the package docstring for usage."""

import sys

from benchmarks.cli import main

sys.exit(main())
