#!/usr/bin/env python
"""Generate, score and tabulate Table 1 (see README.md and configs/eval_*.yaml).

    python scripts/evaluate.py --config configs/eval_tiny_cpu.yaml
    python scripts/evaluate.py --config configs/eval_table1.yaml
"""

import sys

from adrpo_diffusion.evaluation.cli import evaluate_main

if __name__ == "__main__":
    sys.exit(evaluate_main())
