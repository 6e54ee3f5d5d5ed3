"""ADRPOGRPOConfig: TRL's GRPOConfig plus the three numbers of the paper's Eq. 7."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

from trl import GRPOConfig

ADRPO_KEYS = ("beta0", "advantage_min", "advantage_max")  # what ADRPOGRPOConfig adds to TRL's GRPOConfig


@dataclass
class ADRPOGRPOConfig(GRPOConfig):
    r"""Configuration of [`ADRPOGRPOTrainer`]: every field of TRL's `GRPOConfig`, and

    beta0 (`float`, defaults to `0.04`):
        Base KL strength. The KL coefficient of completion i is `beta0 - clip(A_i, advantage_min, advantage_max)`.
        TRL's `beta` is set to `beta0` (it switches the reference model on; with every advantage 0 the loss is
        GRPO's with `beta = beta0`).
    advantage_min (`float`, defaults to `-0.04`), advantage_max (`float`, defaults to `0.04`):
        Clip range of the advantage in the KL coefficient. The advantage is the one TRL's policy-gradient term
        uses, i.e. normalised by the group std when `scale_rewards` is `"group"` (TRL's default).

    `advantage_max > beta0` gives completions with a large advantage a negative KL coefficient (they are pushed
    away from the reference): allowed, with a warning.
    """

    beta0: float = field(default=0.04, metadata={"help": "ADRPO: base KL strength; completion i's KL coefficient is "
                                                         "beta0 - clip(A_i, advantage_min, advantage_max)."})
    advantage_min: float = field(default=-0.04, metadata={"help": "ADRPO: lower clip of the advantage in the KL coefficient."})
    advantage_max: float = field(default=0.04, metadata={"help": "ADRPO: upper clip of the advantage in the KL coefficient."})

    def __post_init__(self):
        problems = []
        if self.beta0 <= 0:
            problems.append(f"beta0 must be > 0, got {self.beta0}")
        if self.advantage_min >= self.advantage_max:
            problems.append(f"advantage_min ({self.advantage_min}) must be < advantage_max ({self.advantage_max})")
        if self.beta not in (0.0, self.beta0):
            problems.append(f"beta ({self.beta}) is set from beta0 ({self.beta0}); leave it unset")
        if problems:
            raise ValueError("Invalid ADRPOGRPOConfig:\n  " + "\n  ".join(problems))
        if self.advantage_max > self.beta0:
            warnings.warn(f"advantage_max ({self.advantage_max}) > beta0 ({self.beta0}): completions with A > beta0 get "
                          "a negative KL coefficient (pushed away from the reference model).", stacklevel=2)
        self.beta = self.beta0
        super().__post_init__()
