"""``NeuronScores``: one fp32 score per ``up_proj`` neuron, ``[layers, d_ff]``, with counts and provenance.

Two reductions (DESIGN.md §3):
- ``sum`` (LRP): ``values`` are sums over samples; parts (ranks, seeds, resumed runs) merge exactly by
  adding values and counts; ``mean()`` divides by the sample count.
- ``score`` (Wanda): ``values`` are the finished score of the whole set (|W|·‖X‖₂ is not additive
  over samples); the callback reduces its own accumulators before it makes one, and seeds combine
  with ``average``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from sparc_engine.errors import SparcError

FORMAT = "sparc-neuron-scores/1"


@dataclass
class NeuronScores:
    values: torch.Tensor
    method: str
    reduction: str = "sum"
    samples: int = 0
    tokens: int = 0
    nonfinite: int = 0
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        self.values = self.values.detach().to(torch.float32).cpu()
        if self.values.ndim != 2:
            raise SparcError(f"neuron scores must be [layers, d_ff], got shape {tuple(self.values.shape)}")
        if self.reduction not in ("sum", "score"):
            raise SparcError(f"unknown reduction {self.reduction!r}")

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.values.shape)

    def mean(self) -> torch.Tensor:
        """Mean score per sample (``sum``) or the set's score (``score``)."""
        if self.reduction == "score":
            return self.values.clone()
        if self.samples <= 0:
            raise SparcError(f"{self.method} scores hold no samples", "attribute on a non-empty reference set")
        return self.values / self.samples

    def merge(self, other: "NeuronScores") -> "NeuronScores":
        """Exact merge of two parts of one set (ranks, resumed parts, seeds pooled)."""
        if self.reduction != "sum" or other.reduction != "sum":
            raise SparcError(f"{self.method} scores are finished set scores and cannot be merged exactly",
                             "combine seed files with `average`")
        self._check_compatible(other)
        return replace(self, values=self.values + other.values, samples=self.samples + other.samples,
                       tokens=self.tokens + other.tokens, nonfinite=self.nonfinite + other.nonfinite,
                       meta=dict(self.meta))

    def _check_compatible(self, other: "NeuronScores") -> None:
        if self.shape != other.shape:
            raise SparcError(f"scores of shape {self.shape} and {other.shape} cannot be combined",
                             "use scores of the same model")
        for key in ("model_fingerprint",):
            a, b = self.meta.get(key), other.meta.get(key)
            if a and b and a != b:
                raise SparcError(f"scores come from different models ({key} {a} vs {b})",
                                 "combine scores of one model only")
        if self.method != other.method:
            raise SparcError(f"scores of methods {self.method!r} and {other.method!r} cannot be combined")

    def check_model(self, model, name: str = "model") -> None:
        """Refuse scores that were computed on another model (shape or fingerprint)."""
        from sparc_engine.models import fingerprint, model_shape

        if model_shape(model) != self.shape:
            raise SparcError(f"scores have shape {self.shape} but {name} has {model_shape(model)} "
                             "(layers, neurons)", "use scores computed on this model")
        want = self.meta.get("model_fingerprint")
        if want and want != fingerprint(model):
            raise SparcError(f"scores were computed on another model (fingerprint {want}, "
                             f"{name} has {fingerprint(model)})", "use scores computed on this model")

    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        from sparc_engine.atomic import atomic_path

        header = {"format": FORMAT, "method": self.method, "reduction": self.reduction,
                  "samples": str(self.samples), "tokens": str(self.tokens), "nonfinite": str(self.nonfinite),
                  "meta": json.dumps(self.meta, sort_keys=True, default=str)}
        with atomic_path(path) as tmp:
            save_file({"values": self.values.contiguous()}, str(tmp), metadata=header)

    @classmethod
    def load(cls, path: str | Path) -> "NeuronScores":
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise SparcError(f"scores file {path} does not exist", "check the path or run `sparc attribute` first")
        try:
            with safe_open(str(path), framework="pt") as f:
                header = f.metadata() or {}
                values = f.get_tensor("values")
        except Exception as e:  # safetensors raises SafetensorError / OSError for truncated files
            raise SparcError(f"scores file {path} is corrupted or truncated ({type(e).__name__})",
                             "delete it and run attribution again") from None
        if header.get("format") != FORMAT:
            raise SparcError(f"{path} is not a sparc_engine scores file", "give a file written by `sparc attribute`")
        return cls(values=values, method=header["method"], reduction=header["reduction"],
                   samples=int(header["samples"]), tokens=int(header["tokens"]),
                   nonfinite=int(header["nonfinite"]), meta=json.loads(header["meta"]))


def average(parts: list[NeuronScores]) -> NeuronScores:
    """Average the per-set means of several files (e.g. C4 seeds 0/1/2), each weighted equally."""
    if not parts:
        raise SparcError("no scores files to average")
    first = parts[0]
    for other in parts[1:]:
        first._check_compatible(other)
    if len(parts) == 1:
        return first
    mean = torch.stack([p.mean() for p in parts]).mean(0)
    meta = dict(first.meta) | {"averaged": [p.meta.get("data", "?") for p in parts]}
    return NeuronScores(values=mean, method=first.method, reduction="score",
                        samples=sum(p.samples for p in parts), tokens=sum(p.tokens for p in parts),
                        nonfinite=sum(p.nonfinite for p in parts), meta=meta)


def nonfinite_share(scores: NeuronScores) -> float:
    """Share of NaN/Inf contributions: per (sample, neuron) for summed scores, per neuron otherwise."""
    per = max(1, scores.samples) if scores.reduction == "sum" else 1
    return scores.nonfinite / (per * scores.values.numel())


def check_finite(scores: NeuronScores, max_share: float) -> None:
    """Fail when more than ``max_share`` of the neurons received NaN/Inf relevance."""
    share = nonfinite_share(scores)
    if share > max_share or (max_share == 0 and scores.nonfinite) or math.isnan(share):
        raise SparcError(f"{scores.method}: {scores.nonfinite} neuron scores are NaN/Inf ({share:.2%}), "
                         f"above the limit of {max_share:.2%}",
                         "run in fp32 (precision 32-true) or raise max_nonfinite_share")
