"""``python -m helpers.gpu_bench [--out DIR] [--quick] [--check]``: see :mod:`helpers.gpu_bench.runner`."""

import sys

from helpers.gpu_bench.runner import main

sys.exit(main())
