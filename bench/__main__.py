"""``python -m bench``: see :mod:`bench.benchmark`."""

import sys

from bench.benchmark import main

sys.exit(main())
