"""``adrpo-evaluate``: generate every model's images, score them metric by metric, aggregate over seeds, and write
``table1.md``, ``table1.csv``, ``table1.tex``, ``results.json`` and ``reward_vs_diversity.png`` into output_dir.

    adrpo-evaluate --config configs/eval_table1.yaml
    adrpo-evaluate --config configs/eval_tiny_cpu.yaml --seeds '[0]'
    adrpo-evaluate --images_dir my_images/ --images_prompts my_images/prompts.csv --output_dir outputs/eval-mine

Each step resumes: existing images and cached scores are reused (see generate.py and score.py).
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path

from ..scorers.diversity import describe
from .aggregate import aggregate
from .config import (
    EvalConfig,
    EvalConfigError,
    check_metric_sources,
    clipdiversity_variant,
    eval_config_from_args,
    load_prompt_set,
)
from .folder import collect_images, undecodable
from .generate import LoraMismatchError, generate_images, warnings_once
from .score import score_all
from .tables import label, plot_reward_vs_diversity, render_csv, render_latex, render_markdown


def evaluate(cfg: EvalConfig) -> dict:
    """Run the whole evaluation for a validated config and write its outputs; returns the results."""
    check_metric_sources(cfg)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    for orphan in out.rglob(".tmp-*"):  # write_atomic's temporaries, left behind by an interrupted run
        orphan.unlink()
    if cfg.images_dir is not None:
        root = Path(cfg.images_dir)
        records = collect_images(cfg.images_dir, cfg.images_prompts)
        bad = undecodable(root, records)
        if bad:
            listing = "\n  ".join(f"{root / path}: {why}" for path, why in list(bad.items())[:10])
            more = f"\n  ... and {len(bad) - 10} more" if len(bad) > 10 else ""
            if not cfg.skip_bad_images:
                raise EvalConfigError(f"{len(bad)} of {len(records)} images under {root} cannot be decoded:\n  {listing}"
                                      f"{more}\nReplace or remove them, or pass --skip_bad_images true to score the rest.")
            print(f"WARNING: skipping {len(bad)} of {len(records)} images that cannot be decoded (--skip_bad_images):\n  "
                  f"{listing}{more}", file=sys.stderr)
            records = [record for record in records if record.path not in bad]
    else:
        root = out / "images"
        prompts = [entry for prompt_set in cfg.prompt_sets
                   for entry in load_prompt_set(prompt_set, cfg.max_prompts_per_set, cfg.heldout_fraction)]
        records = generate_images(cfg, prompts, root)
    scores = score_all(cfg, records, root)
    if scores.failed:
        path, error = next(iter(scores.failed.items()))
        fix = "replace them to score them" if cfg.images_dir is not None else "delete them to regenerate them"
        print(f"WARNING: {len(scores.failed)} image(s) could not be decoded and are left out of every metric (listed "
              f"in results.json; {fix}), e.g. {root / path}: {error}", file=sys.stderr)
    results = aggregate(records, scores, cfg.metrics)
    results["config"] = asdict(cfg)
    write_outputs(results, cfg, out)
    return results


def _rows(results: dict, part=None) -> list:
    """Table rows ``(model, {metric: stat})``, of the overall summaries or of one breakdown ``(kind, key)``."""
    rows = []
    for model, entry in results["models"].items():
        stats = {}
        for metric, summary in entry["metrics"].items():
            stats[metric] = summary if part is None or summary is None else summary[part[0]].get(part[1])
        rows.append((model, stats))
    return rows


def _markdown(results: dict, cfg: EvalConfig) -> str:
    metrics = cfg.metrics
    first = next((s for e in results["models"].values() for s in e["metrics"].values() if s), None)
    lines = ["# Table 1", ""]
    if first is not None:
        lines.append(f"Mean ± standard error over {first['n_seeds']} seed(s) (sample std of the per-seed means / "
                     f"sqrt(seeds); n/a with one seed) of the per-seed mean over {first['n_prompts']} prompts. All "
                     "metrics are higher-is-better: **best**, <u>second best</u>.")
    if "clipdiversity" in metrics:
        lines.append(f"ClipDiversity: {describe(**clipdiversity_variant(cfg.metric_options.get('clipdiversity', {})))}.")
    lines += ["", render_markdown(_rows(results), metrics)]
    failed = {m: e["failed_images"] for m, e in results["models"].items() if e["failed_images"]}
    if failed:
        counts = ", ".join(f"{m}: {n} of {results['models'][m]['images']}" for m, n in failed.items())
        lines.append(f"**Images that could not be decoded, left out:** {counts} (paths in results.json).\n")
    breakdowns = []
    for entry in results["models"].values():
        for summary in entry["metrics"].values():
            if summary:
                breakdowns += [("per_prompt_set", k) for k in summary["per_prompt_set"]]
                breakdowns += [("per_category", k) for k in summary["per_category"]]
    for kind, key in dict.fromkeys(breakdowns):
        title = "Prompt set" if kind == "per_prompt_set" else "Category"
        lines += [f"## {title}: {key}", "", render_markdown(_rows(results, (kind, key)), metrics)]
    return "\n".join(lines)


def write_outputs(results: dict, cfg: EvalConfig, out: Path) -> None:
    rows = _rows(results)
    (out / "table1.md").write_text(_markdown(results, cfg))
    (out / "table1.csv").write_text(render_csv(rows, cfg.metrics))
    (out / "table1.tex").write_text(render_latex(rows, cfg.metrics))
    (out / "results.json").write_text(json.dumps(results, indent=1))
    written = ["table1.md", "table1.csv", "table1.tex", "results.json"]
    if "clipdiversity" in cfg.metrics:
        plot_reward_vs_diversity(rows, cfg.reward_metric, out / "reward_vs_diversity.png")
        written.append("reward_vs_diversity.png")
    else:
        print(f"No reward_vs_diversity.png: metrics has no clipdiversity (x axis; y: {label(cfg.reward_metric)})")
    print(render_markdown(rows, cfg.metrics))
    print(f"Wrote {', '.join(written)} to {out}")


def evaluate_main(argv=None) -> int:
    from ..prompts import PromptFileError

    try:
        cfg = eval_config_from_args(argv)
        with warnings_once():
            evaluate(cfg)
    except (EvalConfigError, PromptFileError, FileNotFoundError, LoraMismatchError) as err:
        print(f"adrpo-evaluate: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(evaluate_main())
