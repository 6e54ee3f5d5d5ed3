"""Table 1 renderers (Markdown, LaTeX, CSV) and the reward-versus-diversity plot.

A table is a list of rows ``(model, {metric: {"mean": float, "se": float | None} or None})``. Every metric is
higher-is-better: per column the best value is bold and the second best underlined. Values are compared as
printed (rounded to the column's decimals), so rows that look equal are marked alike: all rows tied for the best
are bold, the next distinct value is underlined. An SE of None (a single seed) prints as ``n/a``, never as 0.
"""

from __future__ import annotations

import csv
import io

LABELS = {"clipscore": "ClipScore", "clipdiversity": "ClipDiversity", "aesthetic": "Aesthetic",
          "blipscore": "BLIPScore", "imagereward": "ImageReward", "pickscore": "PickScore", "hpsv2": "HPSv2"}
# Decimals per metric, by the scale of its values and of its seed-to-seed spread.
DECIMALS = {"clipscore": 2, "clipdiversity": 3, "aesthetic": 3, "blipscore": 4, "imagereward": 3, "pickscore": 2,
            "hpsv2": 4}
DEFAULT_DECIMALS = 3


def label(metric: str) -> str:
    return LABELS.get(metric, metric)


def format_stat(stat: dict | None, decimals: int, pm: str = "±") -> str:
    """``mean ± se`` at ``decimals``; ``mean ± n/a`` without an SE; ``–`` without a value."""
    if stat is None:
        return "–"
    se = "n/a" if stat["se"] is None else f"{stat['se']:.{decimals}f}"
    return f"{stat['mean']:.{decimals}f} {pm} {se}"


def marks(stats: list, decimals: int) -> list[str]:
    """Per row ``best``, ``second`` or ``""``: ranks of the distinct printed means, higher is better."""
    printed = [None if s is None else round(s["mean"], decimals) for s in stats]
    distinct = sorted({p for p in printed if p is not None}, reverse=True)
    rank = {value: ("best" if i == 0 else "second" if i == 1 else "") for i, value in enumerate(distinct)}
    return ["" if p is None else rank[p] for p in printed]


def _cells(rows, metrics, pm: str, emphasis: dict) -> list[list[str]]:
    table = [[name] for name, _ in rows]
    for metric in metrics:
        decimals = DECIMALS.get(metric, DEFAULT_DECIMALS)
        stats = [values.get(metric) for _, values in rows]
        for line, stat, mark in zip(table, stats, marks(stats, decimals)):
            text = format_stat(stat, decimals, pm)
            line.append(emphasis[mark].format(text) if mark else text)
    return table


def render_markdown(rows, metrics) -> str:
    header = ["Model"] + [f"{label(m)} ↑" for m in metrics]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + [":---:"] * len(metrics)) + "|"]
    for line in _cells(rows, metrics, "±", {"best": "**{}**", "second": "<u>{}</u>"}):
        lines.append("| " + " | ".join(line) + " |")
    return "\n".join(lines) + "\n"


_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
                  **{c: "\\" + c for c in "&%$#_{}"}}


def _latex_escape(text: str) -> str:
    return "".join(_LATEX_SPECIAL.get(char, char) for char in text)


def render_latex(rows, metrics) -> str:
    """A booktabs ``tabular``; needs ``\\usepackage{booktabs}``."""
    escaped = [(_latex_escape(name), values) for name, values in rows]
    lines = [r"\begin{tabular}{l" + "c" * len(metrics) + "}", r"\toprule",
             "Model & " + " & ".join(f"{label(m)} $\\uparrow$" for m in metrics) + r" \\", r"\midrule"]
    for line in _cells(escaped, metrics, "$\\pm$", {"best": "\\textbf{{{}}}", "second": "\\underline{{{}}}"}):
        lines.append(" & ".join(line) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def render_csv(rows, metrics) -> str:
    """One line per model: ``<metric>_mean``, ``<metric>_se`` (empty when not available) and ``<metric>_n_seeds``."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["model"] + [f"{m}_{part}" for m in metrics for part in ("mean", "se", "n_seeds")])
    for name, values in rows:
        line = [name]
        for metric in metrics:
            stat = values.get(metric)
            line += ["", "", ""] if stat is None else [
                repr(stat["mean"]), "" if stat["se"] is None else repr(stat["se"]), stat["n_seeds"]]
        writer.writerow(line)
    return out.getvalue()


def plot_reward_vs_diversity(rows, reward_metric: str, path) -> None:
    """Scatter of the models, x ClipDiversity, y ``reward_metric``, with SE error bars where available."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(5.5, 4.5), layout="constrained")
    axes = figure.add_subplot()
    for name, values in rows:
        x, y = values.get("clipdiversity"), values.get(reward_metric)
        if x is None or y is None:
            continue
        axes.errorbar(x["mean"], y["mean"], xerr=x["se"], yerr=y["se"], fmt="o", capsize=3)
        axes.annotate(name, (x["mean"], y["mean"]), textcoords="offset points", xytext=(5, 5), fontsize=8)
    axes.set_xlabel(f"{label('clipdiversity')} ↑")
    axes.set_ylabel(f"{label(reward_metric)} ↑")
    axes.set_title("Reward vs diversity (mean ± SE over seeds)")
    axes.grid(alpha=0.3)
    figure.savefig(path, dpi=150)
