#!/usr/bin/env python
"""Fine-tune an SD3-family model with ADRPO (or a baseline) and LoRA. See README.md and configs/.

    python scripts/train_sd3.py --config configs/tiny_cpu.yaml
    accelerate launch scripts/train_sd3.py --config configs/sd3_medium_8gpu.yaml
"""

import sys

from adrpo_diffusion.cli import train_main

if __name__ == "__main__":
    sys.exit(train_main())
