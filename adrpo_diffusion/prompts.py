"""Prompt files (plain text, CSV with a ``prompt`` column, JSONL), the train / held-out split, and a resumable prompt
sampler."""

from __future__ import annotations

import csv
import hashlib
import json
import re
from pathlib import Path

import torch


class PromptFileError(ValueError):
    pass


def load_prompts(path: str | Path | list) -> list[str]:
    """Read prompts from ``.txt`` (one per line, ``#`` comments), ``.csv``/``.tsv`` (a ``prompt`` column) or
    ``.jsonl`` (objects with a ``prompt`` field); a list of files gives their prompts one file after the other.
    Raises :class:`PromptFileError` naming the file and line."""
    if isinstance(path, (list, tuple)):
        if not path:
            raise PromptFileError("The list of prompt files is empty; name at least one.")
        return [prompt for one in path for prompt in load_prompts(one)]
    path = Path(path)
    if not path.is_file():
        raise PromptFileError(f"Prompt file {path} does not exist.")
    suffix = path.suffix.lower()
    text = path.read_text(encoding="utf-8")
    if suffix in (".csv", ".tsv"):
        rows = list(csv.DictReader(text.splitlines(), delimiter="\t" if suffix == ".tsv" else ","))
        if not rows or "prompt" not in rows[0]:
            raise PromptFileError(f"{path}: a CSV prompt file needs a header with a 'prompt' column.")
        prompts = [(row["prompt"] or "").strip() for row in rows]
    elif suffix == ".jsonl":
        prompts = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise PromptFileError(f"{path}:{number}: not valid JSON ({err.msg}).") from None
            if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
                raise PromptFileError(f"{path}:{number}: each line must be an object with a string 'prompt' field.")
            prompts.append(record["prompt"].strip())
    elif suffix in (".txt", ""):
        prompts = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    else:
        raise PromptFileError(f"{path}: unknown prompt file type {suffix!r}; use .txt, .csv, .tsv or .jsonl.")
    prompts = [p for p in prompts if p]
    if not prompts:
        raise PromptFileError(f"{path} contains no prompts.")
    return prompts


def is_heldout(prompt: str, fraction: float) -> bool:
    """Whether ``prompt`` belongs to the held-out split that holds about ``fraction`` of all prompts. Decided by a
    hash of the prompt's words alone (case, spacing and punctuation ignored), not by its file or position: the split is the same
    in every run, file list and package version; a prompt found in two files falls on the same side both times;
    the train and held-out splits of one fraction are disjoint, and a larger fraction holds out a superset."""
    digest = hashlib.sha256(" ".join(re.findall(r"\w+", prompt.lower())).encode()).digest()
    return int.from_bytes(digest[:8], "big") < fraction * 2**64


def split_prompts(path: str | Path | list, heldout_fraction: float) -> tuple[list[str], list[str]]:
    """The prompts of ``path`` (a file or a list of files): (those outside the held-out split of ``heldout_fraction``,
    those in it)."""
    prompts = load_prompts(path)
    training = [prompt for prompt in prompts if not is_heldout(prompt, heldout_fraction)]
    if not training:
        raise PromptFileError(f"Every prompt of {path} is in the held-out split (heldout_fraction "
                              f"{heldout_fraction}); lower heldout_fraction or add prompts.")
    return training, [prompt for prompt in prompts if is_heldout(prompt, heldout_fraction)]


def training_prompts(path: str | Path | list, heldout_fraction: float) -> list[str]:
    """The prompts of ``path`` (a file or a list of files) outside the held-out split of ``heldout_fraction``."""
    return split_prompts(path, heldout_fraction)[0]


class PromptSampler:
    """Draws prompt indices epoch by epoch (a fresh permutation each epoch, without replacement inside an
    epoch), from its own seeded generator so that its state is small, explicit and exactly resumable."""

    def __init__(self, num_prompts: int, seed: int):
        self.num_prompts = num_prompts
        self.seed = seed
        self.epoch = 0
        self.position = 0

    def _order(self) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return torch.randperm(self.num_prompts, generator=generator).tolist()

    def draw(self, count: int) -> list[int]:
        drawn = []
        while len(drawn) < count:
            order = self._order()
            take = min(count - len(drawn), self.num_prompts - self.position)
            drawn += order[self.position : self.position + take]
            self.position += take
            if self.position == self.num_prompts:
                self.epoch, self.position = self.epoch + 1, 0
        return drawn

    def state_dict(self) -> dict:
        return {"num_prompts": self.num_prompts, "seed": self.seed, "epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        if state["num_prompts"] != self.num_prompts:
            raise ValueError(
                f"The checkpoint's prompt sampler saw {state['num_prompts']} prompts; the prompt file now has "
                f"{self.num_prompts}. Resume with the same prompt file."
            )
        self.seed, self.epoch, self.position = state["seed"], state["epoch"], state["position"]
