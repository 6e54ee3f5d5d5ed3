"""From per-group values to the numbers in the table: means over prompts, then mean and standard error over seeds.

For a model and a metric, with ``v[s, p]`` the value of prompt ``p`` under seed ``s`` (the mean over its K images,
or the ClipDiversity of those K images)::

    m_s  = mean over prompts p of v[s, p]                  (every prompt counts equally, whatever its set)
    mean = mean over the n seeds of m_s
    SE   = std(m_1 .. m_n, ddof=1) / sqrt(n)                (None when n = 1: one seed says nothing of the spread)

The SE measures how much the result moves with the sampling seed, prompts held fixed. The same recipe gives the
per-prompt-set and per-category numbers, restricted to those prompts.
"""

from __future__ import annotations

from collections import defaultdict

from ..utils import mean_and_se
from .generate import ImageRecord
from .score import Scores


def summarize(values: dict, keep=lambda group: True) -> dict | None:
    """``{mean, se, n_seeds, n_prompts, per_seed}`` over the groups ``(model, seed, set, index)`` that ``keep``
    accepts (all of one model); None when none has a value."""
    by_seed = defaultdict(list)
    for group, value in values.items():
        if keep(group):
            by_seed[group[1]].append(value)
    if not by_seed:
        return None
    per_seed = {seed: sum(v) / len(v) for seed, v in sorted(by_seed.items())}
    mean, se = mean_and_se(per_seed.values())
    prompts = {group[2:] for group in values if keep(group)}
    return {"mean": mean, "se": se, "n_seeds": len(per_seed), "n_prompts": len(prompts), "per_seed": per_seed}


def aggregate(records: list[ImageRecord], scores: Scores, metrics: list[str]) -> dict:
    """The results: per model, per metric the overall summary and its breakdowns by prompt set, by category
    (``<set>/<category>``) and by prompt (``<set>/<index>``, mean over seeds); failure counts per model."""
    prompts = {(r.prompt_set, r.prompt_index): (r.prompt, r.category) for r in records}
    models = list(dict.fromkeys(r.model for r in records))
    results = {"metrics": metrics, "models": {}, "failed_images": [
        {"path": path, "error": error} for path, error in sorted(scores.failed.items())]}
    for model in models:
        mine = [r for r in records if r.model == model]
        entry = {"images": len(mine), "failed_images": sum(r.path in scores.failed for r in mine), "metrics": {}}
        for metric in metrics:
            values = {g: v for g, v in scores.values[metric].items() if g[0] == model}
            overall = summarize(values)
            if overall is None:
                entry["metrics"][metric] = None
                continue
            sets = sorted({g[2] for g in values})
            categories = sorted({(s, c) for (s, _), (_, c) in prompts.items() if c is not None and s in sets})
            overall["per_prompt_set"] = {s: summarize(values, lambda g, s=s: g[2] == s) for s in sets}
            overall["per_category"] = {
                f"{s}/{c}": summarize(values, lambda g, s=s, c=c: g[2] == s and prompts[g[2:]][1] == c)
                for s, c in categories}
            overall["per_prompt"] = {}
            for key in sorted({g[2:] for g in values}):
                summary = summarize(values, lambda g, key=key: g[2:] == key)
                prompt, category = prompts[key]
                overall["per_prompt"][f"{key[0]}/{key[1]}"] = {"prompt": prompt, "category": category, **summary}
            overall["groups_without_value"] = sum(g[0] == model for g in scores.skipped[metric])
            entry["metrics"][metric] = overall
        results["models"][model] = entry
    return results
