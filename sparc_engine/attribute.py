"""``sparc attribute``: model + reference set + attribution callbacks → one scores file per method."""

from __future__ import annotations

import logging
from pathlib import Path

from jsonargparse import lazy_instance

from callbacks.base import AttributionCallback
from callbacks.lrp import LRPAttribution
from callbacks.monitor import RelevanceMonitor
from callbacks.wanda import WandaAttribution
from sparc_engine.atomic import refuse_existing
from sparc_engine.data import Embedded, TextSource
from sparc_engine.engine import Continuations, FabricArgs, attribute_set, launch, load_on_rank, make_fabric
from sparc_engine.errors import SparcError
from sparc_engine.models import check_seq_len
from sparc_engine.scores import NeuronScores, check_finite
from sparc_engine.toxicity import ToxicityScorer

log = logging.getLogger(__name__)


def scores_path(out_dir: Path, method: str) -> Path:
    return Path(out_dir) / f"scores.{method}.safetensors"


def attribute(
    data: TextSource = lazy_instance(Embedded, set="general", split="attribution"),
    model: str = "embedded",
    callbacks: list[AttributionCallback] | None = None,
    out_dir: Path = Path("out/attribute"),
    seq_len: int = 256,
    batch_size: int = 4,
    max_new_tokens: int = 20,
    continuations: Continuations = Continuations(),
    scorer: ToxicityScorer | None = None,
    fabric: FabricArgs = FabricArgs(),
    checkpoint_every: int = 50,
    max_nonfinite_share: float = 0.0,
    tensorboard: bool = True,
    overwrite: bool = False,
) -> dict[str, NeuronScores]:
    """Attribute a reference set: per up_proj neuron scores, one file per method.

    Args:
        data: the reference set (``class_path`` of a ``sparc_engine.data`` source, or your own).
        model: ``embedded``, a hub id, a local directory, a ``.gguf`` file or ``random:<shape>``.
        callbacks: attribution methods (``callbacks.LRPAttribution``, ``callbacks.WandaAttribution`` or
            your own ``AttributionCallback``); default both.
        out_dir: where ``scores.<method>.safetensors``, checkpoints and TensorBoard logs go.
        seq_len: tokens per sample (texts are cut; prompt + continuation must fit).
        batch_size: samples per forward/backward pass on each rank.
        max_new_tokens: length of the model's own continuation explained for prompt sets.
        continuations: how many continuations per prompt, and whether only toxic ones are explained.
        scorer: toxicity scorer for ``continuations.keep_threshold``.
        fabric: accelerator, devices, nodes, strategy and precision.
        checkpoint_every: write partial sums every N batches (a rerun resumes from them).
        max_nonfinite_share: fail when more than this share of neuron contributions is NaN/Inf.
        tensorboard: log relevance statistics and throughput under ``out_dir/tensorboard``.
        overwrite: replace scores already in ``out_dir``.
    """
    callbacks = list(callbacks) if callbacks else [LRPAttribution(), WandaAttribution()]
    methods = [c.method for c in callbacks]
    if len(set(methods)) != len(methods):
        raise SparcError(f"two callbacks share a method name ({', '.join(methods)})", "keep one callback per method")
    _check_args(seq_len, batch_size, max_nonfinite_share)
    out_dir = Path(out_dir)
    for method in methods:
        refuse_existing(scores_path(out_dir, method), overwrite)
    loggers = []
    if tensorboard:
        from lightning.fabric.loggers import TensorBoardLogger

        loggers.append(TensorBoardLogger(root_dir=out_dir / "tensorboard", name="", version="attribute"))
    fab = make_fabric(fabric, callbacks=[*callbacks, RelevanceMonitor()], loggers=loggers)
    return launch(fab, _main, data, model, callbacks, out_dir, seq_len, batch_size, max_new_tokens, continuations,
                  scorer, checkpoint_every, max_nonfinite_share)


def _check_args(seq_len: int, batch_size: int, max_nonfinite_share: float) -> None:
    if seq_len < 2:
        raise SparcError(f"seq_len must be at least 2, got {seq_len}")
    if batch_size < 1:
        raise SparcError(f"batch_size must be at least 1, got {batch_size}")
    if not 0 <= max_nonfinite_share <= 1:
        raise SparcError(f"max_nonfinite_share must be in [0, 1], got {max_nonfinite_share}")


def _main(fabric, data, model_name, callbacks, out_dir, seq_len, batch_size, max_new_tokens, continuations, scorer,
          checkpoint_every, max_nonfinite_share):
    loaded = load_on_rank(fabric, model_name)
    check_seq_len(loaded.model, seq_len)
    results = attribute_set(fabric, loaded, data, callbacks, seq_len=seq_len, batch_size=batch_size,
                            max_new_tokens=max_new_tokens, continuations=continuations, scorer=scorer,
                            checkpoint_dir=out_dir / "checkpoints", checkpoint_every=checkpoint_every)
    fabric.call("on_scores", fabric=fabric, scores=results, tag="attribute")
    for s in results.values():
        check_finite(s, max_nonfinite_share)
    if fabric.global_rank == 0:
        for method, s in results.items():
            s.save(scores_path(out_dir, method))
            log.info("wrote %s (%d samples, %d tokens)", scores_path(out_dir, method), s.samples, s.tokens)
        for lg in fabric.loggers:
            lg.finalize("success")
    return results
