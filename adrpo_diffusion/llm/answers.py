"""Multiple-choice answers in R1 style and the two rewards of the paper's audio experiments, as TRL reward functions.

A completion is expected as ``<think>reasoning</think><answer>choice text</answer>`` (DeepSeek-R1's format).

- :func:`accuracy_reward`: 1 if the text inside the last ``<answer>...</answer>`` matches the correct choice by
  :func:`string_match` (MMAU's rule), else 0 (no answer tag: 0).
- :func:`format_reward`: 1 if the whole completion is one think block followed by one answer block, else 0.

Both take TRL's reward-function arguments (``prompts``, ``completions``, and the dataset's columns as keyword
lists: here ``answer`` and ``choices``) and accept completions as strings or as chat messages.
"""

from __future__ import annotations

import re

ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
R1_FORMAT = re.compile(r"\s*<think>(?:(?!</?think>|</?answer>).)*</think>\s*<answer>(?:(?!</?answer>|</?think>).)*</answer>\s*",
                       re.DOTALL)


def completion_text(completion) -> str:
    """A completion's text: the string itself, or the content of the last message of a chat completion."""
    if isinstance(completion, str):
        return completion
    content = completion[-1]["content"]
    if isinstance(content, list):  # typed content blocks: the text blocks joined
        return "".join(block.get("text", "") for block in content if block.get("type") == "text")
    return content


def extract_answer(text: str) -> str | None:
    """The stripped text of the last ``<answer>...</answer>`` in ``text``; None without one (an unanswered item)."""
    found = ANSWER.findall(text)
    return found[-1].strip() if found else None


def _words(text: str) -> set[str]:
    return set(re.findall(r"\b\w+\b", text.lower()))


def string_match(answer: str, prediction: str, choices: list[str]) -> bool:
    """MMAU's matching rule (its ``evaluation.py``), restated: with word sets (lower-case ``\\w+`` runs), the
    prediction is correct when it contains every word of the answer and no word that occurs only in a wrong choice
    (words shared with the answer do not count against it). An empty prediction is wrong."""
    predicted, correct = _words(prediction), _words(answer)
    if not predicted:
        return False
    wrong_only = set()
    for choice in choices:
        words = _words(choice)
        if words != correct:
            wrong_only |= words - correct
    return correct <= predicted and predicted.isdisjoint(wrong_only)


def accuracy_reward(completions: list, answer: list[str], choices: list[list[str]], **kwargs) -> list[float]:
    """1.0 per completion whose ``<answer>`` matches its correct choice (:func:`string_match`), else 0.0."""
    rewards = []
    for completion, correct, options in zip(completions, answer, choices, strict=True):
        predicted = extract_answer(completion_text(completion))
        rewards.append(float(predicted is not None and string_match(correct, predicted, list(options))))
    return rewards


def format_reward(completions: list, **kwargs) -> list[float]:
    """1.0 per completion that is exactly ``<think>...</think><answer>...</answer>`` (whitespace around the two
    blocks allowed, no nested or repeated tags), else 0.0."""
    return [float(R1_FORMAT.fullmatch(completion_text(c)) is not None) for c in completions]


def first_character_reward(completions: list, answer: list[str], **kwargs) -> list[float]:
    """1.0 per completion whose first character is the row's ``answer``, else 0.0 (string or chat completions): the
    pitch task's reward (:mod:`adrpo_diffusion.tasks.pitch`)."""
    return [float(completion_text(c)[:1] == a) for c, a in zip(completions, answer, strict=True)]
