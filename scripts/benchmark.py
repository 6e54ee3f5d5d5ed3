#!/usr/bin/env python
"""Benchmark the phases of a training iteration and the speed/memory levers. See BENCHMARKS.md.

    python scripts/benchmark.py --arch tiny                       # CPU, tiny pipeline
    python scripts/benchmark.py --arch sd3-medium --device cuda   # full SD3-medium at random init
"""

import sys

from adrpo_diffusion.benchmark import main

if __name__ == "__main__":
    sys.exit(main())
