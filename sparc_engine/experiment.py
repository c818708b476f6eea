"""``sparc run``: attribute (general + toxic) → prune → evaluate baseline, pruned, random control and a
K sweep for every method → metrics.json, report.md, plots, TensorBoard scalars, neurons files."""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path

import torch
from jsonargparse import lazy_instance
from tqdm.auto import tqdm

from callbacks.base import AttributionCallback
from callbacks.lrp import LRPAttribution
from callbacks.monitor import RelevanceMonitor
from callbacks.wanda import WandaAttribution
from sparc_engine.attribute import scores_path
from sparc_engine.atomic import refuse_existing
from sparc_engine.commands import EvalSettings, evaluate_loaded
from sparc_engine.data import Embedded, TextSource
from sparc_engine.engine import Continuations, FabricArgs, attribute_set, launch, load_on_rank, make_fabric
from sparc_engine.errors import SparcError
from sparc_engine.models import check_seq_len, fingerprint
from sparc_engine.pruning import Pruned, Selection, differential, random_neurons, select, write_neurons
from sparc_engine.report import bar_check, row_of, write_report
from sparc_engine.scores import NeuronScores, check_finite
from sparc_engine.toxicity import ProfanityCheck, ToxicityScorer

log = logging.getLogger(__name__)


def run(
    model: str = "embedded",
    general: TextSource = lazy_instance(Embedded, set="general", split="attribution"),
    toxic: TextSource = lazy_instance(Embedded, set="toxic", split="attribution"),
    callbacks: list[AttributionCallback] | None = None,
    k: int = 50,
    sweep: list[int] = [25, 50, 100, 200],
    selection: Selection = Selection(),
    random_seed: int = 0,
    perplexity_data: TextSource = lazy_instance(Embedded, set="general", split="test"),
    eval_prompts: TextSource = lazy_instance(Embedded, set="toxic", split="test"),
    scorer: ToxicityScorer = lazy_instance(ProfanityCheck),
    evaluation: EvalSettings = EvalSettings(),
    seq_len: int = 256,
    batch_size: int = 4,
    max_new_tokens: int = 20,
    continuations: Continuations = Continuations(),
    fabric: FabricArgs = FabricArgs(),
    max_nonfinite_share: float = 0.0,
    out_dir: Path = Path("out/run"),
    overwrite: bool = False,
) -> dict:
    """The whole experiment on one model.

    Args:
        model: the model (as for ``sparc attribute``).
        general: reference set of general text.
        toxic: reference set of toxic prompts (the model's own continuations are explained).
        callbacks: attribution methods; default LRP explaining log p (chosen on the validation
            split, see README) and Wanda.
        k: default number of neurons to prune (the report's bar is checked here).
        sweep: further K values evaluated per method (plots against K).
        selection: differential options of the targeted variant; the paper's plain formula is always
            evaluated beside it at the default K.
        random_seed: seed of the random-neuron control (same K).
        perplexity_data: text for perplexity.
        eval_prompts: prompts whose continuations are scored; must be held out from ``toxic``.
        scorer: toxicity scorer.
        evaluation: perplexity and sampling settings.
        seq_len: attribution tokens per sample.
        batch_size: attribution samples per pass.
        max_new_tokens: length of the explained continuation of toxic prompts.
        continuations: how many continuations per toxic prompt, and whether only those the scorer
            rates toxic are explained.
        fabric: accelerator, devices, nodes, strategy, precision for attribution.
        max_nonfinite_share: fail when more NaN/Inf relevance than this share.
        out_dir: results; scores already there (same model, data and seq_len) are reused.
        overwrite: replace a finished run in ``out_dir``.
    """
    callbacks = list(callbacks) if callbacks else [LRPAttribution(target="logprob"), WandaAttribution()]
    refuse_existing(Path(out_dir) / "metrics.json", overwrite)
    ks = sorted(set(sweep) | {k})
    if min(ks) <= 0:
        raise SparcError(f"K values must be positive, got {ks}")
    if eval_prompts.name == toxic.name:
        raise SparcError(f"eval_prompts and toxic are the same set ({toxic.name})",
                         "evaluate on held-out prompts (e.g. split: test)")
    overlap = set(eval_prompts.texts()) & set(toxic.texts())
    if overlap:
        raise SparcError(f"{len(overlap)} evaluation prompts are also attribution prompts",
                         "hold the evaluation prompts out from attribution")
    from lightning.fabric.loggers import TensorBoardLogger

    logger = TensorBoardLogger(root_dir=Path(out_dir) / "tensorboard", name="", version="run")
    fab = make_fabric(fabric, callbacks=[*callbacks, RelevanceMonitor()], loggers=[logger])
    return launch(fab, _main, dict(locals(), ks=ks))


def _attribute(fabric, loaded, source, callbacks, tag, a) -> dict[str, NeuronScores]:
    """Scores of one set, reused from ``out_dir/scores/<tag>`` when they match model and data."""
    out = Path(a["out_dir"]) / "scores" / tag
    paths = {c.method: scores_path(out, c.method) for c in callbacks}
    want = {"model_fingerprint": fingerprint(loaded.model), "data": source.name, "seq_len": a["seq_len"]}
    if source.kind == "prompts":
        want["explain"] = asdict(a["continuations"]) | {"max_new_tokens": a["max_new_tokens"]}
    if all(p.exists() for p in paths.values()):
        cached = {m: NeuronScores.load(p) for m, p in paths.items()}
        if all(all(s.meta.get(key) == value for key, value in want.items()) for s in cached.values()):
            log.info("reusing %s scores from %s (same model, data, seq_len and continuations)", tag, out)
            return cached
    results = attribute_set(fabric, loaded, source, callbacks, seq_len=a["seq_len"], batch_size=a["batch_size"],
                            max_new_tokens=a["max_new_tokens"], continuations=a["continuations"], scorer=a["scorer"],
                            checkpoint_dir=out / "checkpoints", tag=tag)
    fabric.call("on_scores", fabric=fabric, scores=results, tag=tag)
    for s in results.values():
        check_finite(s, a["max_nonfinite_share"])
    if fabric.global_rank == 0:
        for method, s in results.items():
            s.save(paths[method])
    return results


def _main(fabric, a: dict):
    loaded = load_on_rank(fabric, a["model"])
    check_seq_len(loaded.model, max(a["seq_len"], a["evaluation"].seq_len))
    callbacks = a["callbacks"]
    general = _attribute(fabric, loaded, a["general"], callbacks, "general", a)
    toxic = _attribute(fabric, loaded, a["toxic"], callbacks, "toxic", a)
    if fabric.global_rank != 0:
        return None
    out_dir, settings, sel = Path(a["out_dir"]), a["evaluation"], a["selection"]
    documents = a["perplexity_data"].documents(loaded.tokenizer)
    prompts = a["eval_prompts"].texts()

    # every variant to evaluate: (label, method, kind, neurons)
    variants, neuron_files, layer_stats = [], [], {}
    for method in general:
        g, t = general[method].mean(), toxic[method].mean()
        diff, paper = differential(g, t, sel), differential(g, t, Selection.paper())
        chosen = {kk: select(diff, kk) for kk in a["ks"]}
        paper_k = select(paper, a["k"])
        for name, neurons, how in [(f"neurons.{method}.json", chosen[a["k"]], sel),
                                   (f"neurons.{method}.paper.json", paper_k, Selection.paper())]:
            write_neurons(out_dir / name, neurons, model=a["model"], model_fingerprint=fingerprint(loaded.model),
                          method=method, selection=asdict(how), general_data=a["general"].name,
                          toxic_data=a["toxic"].name)
            neuron_files.append(name)
        variants += [(f"{method} ({sel.label()})", method, "targeted", chosen[kk]) for kk in a["ks"]]
        variants.append((f"{method} (paper)", method, "paper", paper_k))
        layer_stats[method] = _layer_shares(g, t, chosen[a["k"]])
    variants.append(("random control", "random", "random", random_neurons(tuple(g.shape), a["k"], a["random_seed"])))

    baseline = evaluate_loaded(loaded, documents, prompts, a["scorer"], settings, progress=False)
    base_row = row_of("baseline", "none", "baseline", 0, baseline, None)
    rows = [base_row]
    for label, method, kind, neurons in tqdm(variants, desc="evaluate variants", unit="variant"):
        with Pruned(loaded.model, neurons):
            metrics = evaluate_loaded(loaded, documents, prompts, a["scorer"], settings, progress=False)
        rows.append(row_of(label, method, kind, len(neurons), metrics, base_row))
        log.info("%-32s K=%-4d ppl %.3f (%+.1f %%)  toxicity %.4f (%+.1f %%)", label, len(neurons),
                 rows[-1]["perplexity"], rows[-1]["perplexity_change_pct"], rows[-1]["mean_toxicity"],
                 rows[-1]["toxicity_change_pct"])
    control = next(r for r in rows if r["kind"] == "random")
    bar = {m: bar_check(next(r for r in rows if r["method"] == m and r["kind"] == "targeted" and r["k"] == a["k"]),
                        control) for m in general}
    bar |= {f"{m} (paper)": bar_check(next(r for r in rows if r["method"] == m and r["kind"] == "paper"), control)
            for m in general}
    metrics = {"settings": {"model": a["model"], "general": a["general"].name, "toxic": a["toxic"].name,
                            "eval_prompts": a["eval_prompts"].name, "perplexity_data": a["perplexity_data"].name,
                            "scorer": a["scorer"].name, "k": a["k"], "sweep": a["ks"], "selection": sel.label(),
                            "eval": asdict(settings), "seq_len": a["seq_len"], "random_seed": a["random_seed"],
                            "methods": list(general), "continuations": asdict(a["continuations"])},
               "rows": rows, "bar": bar, "neurons_files": neuron_files,
               "baseline_samples": baseline["toxicity"]["samples"]}
    _log_scalars(fabric, rows)
    write_report(out_dir, metrics, layer_stats)
    print(f"report: {out_dir / 'report.md'}")
    return metrics


def _layer_shares(general: torch.Tensor, toxic: torch.Tensor, chosen) -> dict[str, torch.Tensor]:
    picked = torch.zeros(general.shape[0])
    for n in chosen:
        picked[n.layer] += 1
    share = lambda v: v.abs().sum(1) / v.abs().sum()  # noqa: E731
    return {"|general| share": share(general), "|toxic| share": share(toxic), "pruned share": picked / len(chosen)}


def _log_scalars(fabric, rows) -> None:
    for r in rows:
        if r["kind"] in ("targeted", "random"):
            tag = f"run/{r['method']}" if r["kind"] == "targeted" else "run/random"
            fabric.log_dict({f"{tag}/mean_toxicity": r["mean_toxicity"], f"{tag}/perplexity": r["perplexity"]},
                            step=r["k"])
    for lg in fabric.loggers:
        lg.finalize("success")
