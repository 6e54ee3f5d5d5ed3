"""Console entry points."""

from __future__ import annotations

import sys


def train_main(argv=None) -> int:
    from .config import ConfigError, config_from_args
    from .prompts import PromptFileError

    try:
        cfg = config_from_args(argv)
        from .trainer import Trainer

        trainer = Trainer(cfg)
    except (ConfigError, PromptFileError, FileNotFoundError, ValueError, ImportError) as err:
        print(f"adrpo-train: error: {err}", file=sys.stderr)
        return 2
    trainer.train()
    return 0


if __name__ == "__main__":
    sys.exit(train_main())
