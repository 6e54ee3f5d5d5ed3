"""Console entry points."""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path


def resume_command(argv: list[str]) -> str:
    """The ``adrpo-train`` command that continues the run of ``argv``: its arguments, with
    ``--resume_from_checkpoint latest`` in place of any resume or overwrite option."""
    args, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg.split("=", 1)[0] in ("--resume_from_checkpoint", "--overwrite_output_dir"):
            skip = "=" not in arg  # its value is the next argument
        else:
            args.append(arg)
    return shlex.join(["adrpo-train", *args, "--resume_from_checkpoint", "latest"])


def train_main(argv=None) -> int:
    """``adrpo-train``. Exit codes: 0 done; 2 bad input (nothing ran); 128 + N stopped by signal N with a checkpoint
    (SIGTERM 143, SIGUSR1 138, Ctrl-C 130); 1 another stop (:class:`~.faults.RunStopped`: a failing reward, a failed
    write, a lost process, non-finite steps). Every stop prints the last checkpoint and the command that continues."""
    from .checkpoint import list_checkpoints
    from .config import ConfigError, config_from_args
    from .faults import RunStopped
    from .prompts import PromptFileError

    argv = sys.argv[1:] if argv is None else list(argv)
    cfg = None

    def stopped(message: str, code: int) -> int:
        checkpoints = list_checkpoints(Path(cfg.output_dir) / "checkpoints") if cfg else []
        last = f"the last checkpoint is {checkpoints[-1][1]}" if checkpoints else "no checkpoint was written yet"
        launcher = ("\n  launched as this run was (torchrun or accelerate launch, the same number of processes)"
                    if int(os.environ.get("WORLD_SIZE", "1")) > 1 else "")
        print(f"\nadrpo-train: {message}; {last}. Continue with:\n  {resume_command(argv)}{launcher}", file=sys.stderr)
        return code

    try:
        try:
            cfg = config_from_args(argv)
            from .trainer import Trainer

            trainer = Trainer(cfg)
        except (ConfigError, PromptFileError, FileNotFoundError, FileExistsError, ValueError, ImportError) as err:
            print(f"adrpo-train: error: {err}", file=sys.stderr)
            return 2
        trainer.train()
    except RunStopped as err:
        return stopped(str(err), err.exit_code)
    except KeyboardInterrupt:
        return stopped("interrupted", 130)
    return 0


if __name__ == "__main__":
    sys.exit(train_main())
