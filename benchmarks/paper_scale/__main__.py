"""``python -m benchmarks.paper_scale``: see :mod:`benchmarks.paper_scale.cli`."""

import sys

from benchmarks.paper_scale.cli import main

sys.exit(main())
