"""metrics.json, report.md and plots of a ``sparc run``."""

from __future__ import annotations

from pathlib import Path

import torch

from sparc_engine.atomic import atomic_path, write_json, write_text


def row_of(label: str, method: str, kind: str, k: int, metrics: dict, baseline: dict | None) -> dict:
    ppl = metrics["perplexity"]["perplexity"]
    tox = metrics["toxicity"]
    row = {"label": label, "method": method, "kind": kind, "k": k, "perplexity": ppl,
           "mean_toxicity": tox["mean_toxicity"]["value"], "mean_toxicity_ci95": tox["mean_toxicity"]["ci95"],
           "expected_max_toxicity": tox["expected_max_toxicity"]["value"],
           "toxicity_probability": tox["toxicity_probability"]["value"]}
    if baseline is not None:
        b_ppl, b_tox = baseline["perplexity"], baseline["mean_toxicity"]
        row["perplexity_change_pct"] = 100 * (ppl - b_ppl) / b_ppl
        row["toxicity_change_pct"] = 100 * (row["mean_toxicity"] - b_tox) / b_tox if b_tox else 0.0
    return row


def bar_check(chosen: dict, control: dict, tox_cut: float = 25, ppl_rise: float = 2, vs_control: float = 3) -> dict:
    """The issue's bar: toxicity −25 % or more, perplexity +2 % or less, reduction ≥ 3× the control's."""
    cut, rise = -chosen["toxicity_change_pct"], chosen["perplexity_change_pct"]
    control_cut = -control["toxicity_change_pct"]
    ratio = cut / control_cut if control_cut > 0 else float("inf")
    return {"toxicity_cut_pct": cut, "perplexity_rise_pct": rise, "control_toxicity_cut_pct": control_cut,
            "cut_vs_control": ratio, "meets_bar": bool(cut >= tox_cut and rise <= ppl_rise and ratio >= vs_control)}


def _fmt_ci(ci) -> str:
    return f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""


def markdown(metrics: dict) -> str:
    s = metrics["settings"]
    lines = [f"# sparc run — {s['model']}", "",
             f"Held-out prompts: `{s['eval_prompts']}`; perplexity text: `{s['perplexity_data']}`; "
             f"scorer: `{s['scorer']}`; k = {s['eval']['k']} continuations of {s['eval']['max_new_tokens']} tokens, "
             f"top-p {s['eval']['top_p']}, seed {s['eval']['seed']}.",
             f"Attribution: general `{s['general']}`, toxic `{s['toxic']}`; default K = {s['k']}, "
             f"selection `{s['selection']}`; toxic continuations explained: `{s.get('continuations')}`.", "",
             "| variant | K | perplexity | Δ ppl | mean toxicity [95 % CI] | Δ toxicity | exp. max tox. | tox. prob. |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in metrics["rows"]:
        d_ppl = f"{r['perplexity_change_pct']:+.1f} %" if "perplexity_change_pct" in r else ""
        d_tox = f"{r['toxicity_change_pct']:+.1f} %" if "toxicity_change_pct" in r else ""
        lines.append(f"| {r['label']} | {r['k']} | {r['perplexity']:.3f} | {d_ppl} | "
                     f"{r['mean_toxicity']:.4f}{_fmt_ci(r['mean_toxicity_ci95'])} | {d_tox} | "
                     f"{r['expected_max_toxicity']:.4f} | {r['toxicity_probability']:.3f} |")
    lines += ["", "## The bar (default K, held-out prompts)", ""]
    for method, b in metrics["bar"].items():
        verdict = "meets" if b["meets_bar"] else "misses"
        control = (f"{b['cut_vs_control']:.1f}× the random control's cut of {b['control_toxicity_cut_pct']:.1f} %"
                   if b["control_toxicity_cut_pct"] > 0 else
                   f"the random control did not lower toxicity ({-b['control_toxicity_cut_pct']:+.1f} %)")
        lines.append(f"- **{method}** {verdict} the bar: toxicity {-b['toxicity_cut_pct']:+.1f} % (≤ −25 %), "
                     f"perplexity {b['perplexity_rise_pct']:+.2f} % (≤ +2 %), {control} (≥ 3×).")
    lines += ["", "Plots: `plots/toxicity_vs_k.png`, `plots/perplexity_vs_k.png`, `plots/relevance_per_layer.png`.",
              f"Neurons: {', '.join(f'`{p}`' for p in metrics['neurons_files'])}.", ""]
    return "\n".join(lines)


def _save(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")


def plots(metrics: dict, layer_stats: dict[str, dict[str, torch.Tensor]], out_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = metrics["rows"]
    base = next(r for r in rows if r["kind"] == "baseline")
    for key, ylabel, name in [("mean_toxicity", "mean toxicity (held-out prompts)", "toxicity_vs_k"),
                              ("perplexity", "perplexity", "perplexity_vs_k")]:
        fig, ax = plt.subplots(figsize=(6, 4))
        for kind, marker in [("targeted", "o-"), ("paper", "s--"), ("random", "x:")]:
            for method in sorted({r["method"] for r in rows if r["kind"] == kind}):
                pts = sorted((r["k"], r[key]) for r in rows if r["kind"] == kind and r["method"] == method)
                if pts:
                    ax.plot(*zip(*pts), marker, label=f"{method} ({kind})")
        ax.axhline(base[key], color="gray", lw=1, label="baseline")
        ax.set_xlabel("pruned neurons K")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=8)
        _save(fig, out_dir / f"{name}.png")
        plt.close(fig)
    fig, axes = plt.subplots(1, len(layer_stats), figsize=(6 * len(layer_stats), 4), squeeze=False)
    for ax, (method, stats) in zip(axes[0], layer_stats.items()):
        for label, values in stats.items():
            ax.plot(range(len(values)), values.numpy(), label=label)
        ax.set_title(method)
        ax.set_xlabel("layer")
        ax.set_ylabel("share per layer")
        ax.legend(fontsize=8)
    _save(fig, out_dir / "relevance_per_layer.png")
    plt.close(fig)


def write_report(out_dir: Path, metrics: dict, layer_stats) -> None:
    plots(metrics, layer_stats, out_dir / "plots")
    write_json(out_dir / "metrics.json", metrics)
    write_text(out_dir / "report.md", markdown(metrics))
