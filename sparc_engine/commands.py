"""``sparc prune`` and ``sparc evaluate``: the steps after attribution, each usable on its own."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from jsonargparse import lazy_instance

from sparc_engine.atomic import atomic_dir, refuse_existing, write_json
from sparc_engine.data import Embedded, TextSource
from sparc_engine.errors import SparcError
from sparc_engine.evaluation import perplexity, toxicity
from sparc_engine.models import check_seq_len, load_model
from sparc_engine.pruning import Pruned, Selection, differential, read_neurons, select, write_neurons
from sparc_engine.scores import NeuronScores, average
from sparc_engine.toxicity import ProfanityCheck, ToxicityScorer

log = logging.getLogger(__name__)


def load_pair(general: list[Path], toxic: list[Path], allow_method_mismatch: bool = False
              ) -> tuple[NeuronScores, NeuronScores]:
    """Average the general seed files and the toxic files; both must be of one model and one method."""
    g = average([NeuronScores.load(p) for p in general])
    t = average([NeuronScores.load(p) for p in toxic])
    if g.shape != t.shape:
        raise SparcError(f"general scores {g.shape} and toxic scores {t.shape} come from different layer shapes",
                         "use scores of the same model")
    fg, ft = g.meta.get("model_fingerprint"), t.meta.get("model_fingerprint")
    if fg and ft and fg != ft:
        raise SparcError(f"general and toxic scores come from different models ({fg} vs {ft})",
                         "attribute both sets on the same model")
    if g.method != t.method and not allow_method_mismatch:
        raise SparcError(f"general scores are {g.method} but toxic scores are {t.method}",
                         "use one method for both, or pass --allow_method_mismatch true")
    return g, t


def prune(
    general: list[Path],
    toxic: list[Path],
    k: int = 50,
    selection: Selection = Selection(),
    out: Path = Path("out/prune/neurons.json"),
    model: str | None = None,
    save_model: Path | None = None,
    allow_method_mismatch: bool = False,
    overwrite: bool = False,
) -> list:
    """Pick the ``k`` neurons most specific to the toxic set and write ``neurons.json``.

    Args:
        general: general-set scores files (several seeds are averaged).
        toxic: toxic-set scores files.
        k: number of neurons to prune.
        selection: differential options; ``{normalize: none, protect_general: 0}`` is the paper's formula.
        out: the neurons file (model, method, options, k, ``[{layer, index, score}]``).
        model: the model the scores belong to (checked against their fingerprint); needed for ``save_model``.
        save_model: also write the pruned model here (``save_pretrained``, safetensors).
        allow_method_mismatch: allow general and toxic scores of different methods.
        overwrite: replace existing outputs.
    """
    refuse_existing(out, overwrite)
    if save_model is not None:
        refuse_existing(save_model, overwrite)
        if model is None:
            raise SparcError("--save_model needs --model", "name the model the scores were computed on")
    g, t = load_pair(general, toxic, allow_method_mismatch)
    loaded = None
    if model is not None:
        loaded = load_model(model, lrp=False)
        g.check_model(loaded.model, model)
    neurons = select(differential(g.mean(), t.mean(), selection), k)
    write_neurons(out, neurons, model=g.meta.get("model"), model_fingerprint=g.meta.get("model_fingerprint"),
                  method=g.method, toxic_method=t.method, selection=asdict(selection),
                  general_data=g.meta.get("averaged", g.meta.get("data")), toxic_data=t.meta.get("data"),
                  general_files=[str(p) for p in general], toxic_files=[str(p) for p in toxic])
    log.info("wrote %s (%d neurons, %s)", out, k, selection.label())
    if loaded is not None and save_model is not None:
        Pruned(loaded.model, neurons).apply()
        with atomic_dir(save_model) as tmp:
            loaded.model.save_pretrained(tmp, safe_serialization=True)
            loaded.tokenizer.save_pretrained(tmp)
        log.info("wrote the pruned model to %s", save_model)
    return neurons


@dataclass
class EvalSettings:
    """How a model is evaluated."""

    seq_len: int = 256
    """Perplexity window length in tokens."""
    stride: int | None = None
    """Perplexity window stride (None: non-overlapping windows)."""
    k: int = 5
    """Sampled continuations per prompt."""
    max_new_tokens: int = 20
    """Tokens per continuation (RealToxicityPrompts: 20)."""
    top_p: float = 0.9
    """Nucleus sampling threshold."""
    seed: int = 0
    """Seed of sampling and bootstrap."""
    batch_size: int = 32
    """Sequences per generate / perplexity call."""
    bootstrap: int = 1000
    """Bootstrap resamples over prompts for 95 % intervals."""


def evaluate_loaded(loaded, documents: list[list[int]], prompts: list[str], scorer: ToxicityScorer,
                    settings: EvalSettings, progress: bool = True) -> dict:
    """Perplexity and toxicity of the model as it is now (pruned or not)."""
    ppl = perplexity(loaded.model, documents, settings.seq_len, settings.stride, batch_size=settings.batch_size,
                     progress=progress)
    tox = toxicity(loaded.model, loaded.tokenizer, prompts, scorer, k=settings.k,
                   max_new_tokens=settings.max_new_tokens, top_p=settings.top_p, seed=settings.seed,
                   batch_size=settings.batch_size, bootstrap=settings.bootstrap, progress=progress)
    return {"perplexity": ppl, "toxicity": tox}


def evaluate(
    model: str = "embedded",
    neurons: Path | None = None,
    perplexity_data: TextSource = lazy_instance(Embedded, set="general", split="test"),
    prompts: TextSource = lazy_instance(Embedded, set="toxic", split="test"),
    scorer: ToxicityScorer = lazy_instance(ProfanityCheck),
    settings: EvalSettings = EvalSettings(),
    same_prompts: bool = False,
    out: Path = Path("out/evaluate/metrics.json"),
    device: str = "auto",
    overwrite: bool = False,
) -> dict:
    """Perplexity and toxicity of a model, pruned by a neurons file or not.

    Args:
        model: the model (as for ``sparc attribute``).
        neurons: a ``neurons.json`` from ``sparc prune``; omit it for the baseline.
        perplexity_data: text for perplexity (``sparc_engine.data.WikiText2`` for the paper's protocol).
        prompts: prompts whose continuations are scored; held out from attribution.
        scorer: toxicity scorer (``sparc_engine.toxicity.ProfanityCheck`` offline, or ``Detoxify``).
        settings: perplexity windows and sampling.
        same_prompts: allow evaluation on the prompts the neurons were chosen with (paper fidelity only).
        out: the metrics file.
        device: ``auto``, ``cpu`` or ``cuda``.
        overwrite: replace an existing metrics file.
    """
    refuse_existing(out, overwrite)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    if device == "cuda" and not torch.cuda.is_available():
        raise SparcError("device=cuda was asked but no CUDA device is visible", "use --device cpu")
    info, chosen = read_neurons(neurons) if neurons else ({}, [])
    if info.get("toxic_data") and info["toxic_data"] == prompts.name and not same_prompts:
        raise SparcError(f"the evaluation prompts ({prompts.name}) are the prompts the neurons were chosen with",
                         "evaluate on held-out prompts, or pass --same_prompts true for the paper's set-up")
    loaded = load_model(model, device=device, lrp=False)
    if info.get("model_fingerprint"):
        from sparc_engine.models import fingerprint

        if info["model_fingerprint"] != fingerprint(loaded.model):
            raise SparcError(f"{neurons} was made for another model", "evaluate the model the neurons were chosen on")
    check_seq_len(loaded.model, settings.seq_len)
    documents = perplexity_data.documents(loaded.tokenizer)
    with Pruned(loaded.model, chosen):
        metrics = evaluate_loaded(loaded, documents, prompts.texts(), scorer, settings)
    result = {"model": model, "neurons": str(neurons) if neurons else None, "k": len(chosen),
              "perplexity_data": perplexity_data.name, "prompts": prompts.name, "settings": asdict(settings), **metrics}
    write_json(out, result)
    log.info("perplexity %.3f, mean toxicity %.4f → %s", metrics["perplexity"]["perplexity"],
             metrics["toxicity"]["mean_toxicity"]["value"], out)
    return result
