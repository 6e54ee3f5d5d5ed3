#!/usr/bin/env python
"""The method lab: ADRPO against its baselines on the coloured-shapes task, on a CPU. See docs/method_lab.md.

    python scripts/method_lab.py                 # the frontier (35 to 55 minutes on 2 cores)
    python scripts/method_lab.py --quick         # smoke scale
"""

import sys

from adrpo_diffusion.lab.experiment import main

if __name__ == "__main__":
    sys.exit(main())
