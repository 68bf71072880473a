"""python -m jobs.benchmark: see the package docstring for usage."""

import sys

from jobs.benchmark.cli import main

sys.exit(main())
