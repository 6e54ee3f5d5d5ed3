"""Prompt files (plain text, CSV with a ``prompt`` column, JSONL) and a resumable prompt sampler."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import torch


class PromptFileError(ValueError):
    pass


def load_prompts(path: str | Path) -> list[str]:
    """Read prompts from ``.txt`` (one per line, ``#`` comments), ``.csv``/``.tsv`` (a ``prompt`` column) or
    ``.jsonl`` (objects with a ``prompt`` field). Raises :class:`PromptFileError` naming the file and line."""
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
