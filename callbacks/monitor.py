"""TensorBoard monitoring of an attribution run: throughput while it runs, relevance statistics at the end."""

from __future__ import annotations

import time

import torch

from sparc_engine.scores import NeuronScores


def top_share(values: torch.Tensor, fraction: float = 0.01) -> float:
    """Share of the total |score| held by the top ``fraction`` of neurons."""
    flat = values.abs().flatten()
    k = max(1, int(round(fraction * flat.numel())))
    total = flat.sum()
    return float(flat.topk(k).values.sum() / total) if total > 0 else 0.0


class RelevanceMonitor:
    def __init__(self, log_every_n_batches: int = 10):
        """Log samples/s and tokens/s every N batches, and per-layer histograms, means and the top-1 %
        share of every method's scores when the run ends. Rank 0 logs."""
        self.log_every_n_batches = log_every_n_batches

    def on_attribution_start(self) -> None:
        self._t0, self._batches, self._samples, self._tokens = time.perf_counter(), 0, 0, 0

    def on_batch_end(self, fabric, batch) -> None:
        self._batches += 1
        self._samples += int(batch.sample_weight.sum())
        self._tokens += int(batch.attention_mask.sum())
        if self._batches % self.log_every_n_batches == 0:
            elapsed = time.perf_counter() - self._t0
            fabric.log_dict({"throughput/samples_per_s": self._samples / elapsed,
                             "throughput/tokens_per_s": self._tokens / elapsed}, step=self._batches)

    def on_scores(self, fabric, scores: dict[str, NeuronScores], tag: str) -> None:
        if fabric.global_rank != 0 or not fabric.loggers:
            return
        writer = getattr(fabric.logger, "experiment", None)
        for method, s in scores.items():
            mean = s.mean()
            fabric.log_dict({f"{tag}/{method}/top1pct_share": top_share(mean),
                             f"{tag}/{method}/nonfinite": float(s.nonfinite)}, step=0)
            for layer in range(mean.shape[0]):
                fabric.log(f"{tag}/{method}/layer_mean", float(mean[layer].mean()), step=layer)
                if writer is not None and hasattr(writer, "add_histogram"):
                    writer.add_histogram(f"{tag}/{method}/layer_{layer:02d}", mean[layer], global_step=0)
