"""Differential relevance, neuron selection, and pruning (zero up_proj row, gate_proj row, down_proj column).

The paper ranks neurons by R̄_general − R̄_toxic and prunes the most negative. On a small model that
picks neurons with huge relevance on both sets and breaks the model (DESIGN.md §4), so two options
exist beside the paper-faithful form: each set's mean can be normalised to unit total |relevance|
(the sets explain different numbers of tokens), and the neurons most relevant to general text can
be protected from selection.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch

from sparc_engine.atomic import write_json
from sparc_engine.errors import SparcError
from sparc_engine.models import mlp_layers, model_shape

Normalize = Literal["none", "l1", "max"]


@dataclass
class Selection:
    """How neurons are chosen from general and toxic scores."""

    normalize: Normalize = "l1"
    """Scale each set's mean scores before the difference: ``none`` (paper), ``l1`` (unit total |score|)
    or ``max`` (unit largest |score|)."""
    protect_general: float = 0.2
    """Never prune the neurons in this top fraction of general |score| (0 = paper)."""

    @classmethod
    def paper(cls) -> "Selection":
        return cls(normalize="none", protect_general=0.0)

    def label(self) -> str:
        return "paper" if self == Selection.paper() else f"norm={self.normalize},protect={self.protect_general:g}"


def _normalized(values: torch.Tensor, how: Normalize) -> torch.Tensor:
    if how == "none":
        return values
    scale = values.abs().sum() if how == "l1" else values.abs().max()
    return values / scale if scale > 0 else values


def differential(general: torch.Tensor, toxic: torch.Tensor, selection: Selection) -> torch.Tensor:
    """R̄_general − R̄_toxic (after normalisation); protected neurons get +inf so they are never picked."""
    if general.shape != toxic.shape:
        raise SparcError(f"general scores {tuple(general.shape)} and toxic scores {tuple(toxic.shape)} differ in shape",
                         "use scores of the same model")
    if not (torch.isfinite(general).all() and torch.isfinite(toxic).all()):
        raise SparcError("scores hold NaN/Inf values", "recompute them (see the nonfinite count in their metadata)")
    if not 0 <= selection.protect_general < 1:
        raise SparcError(f"protect_general must be in [0, 1), got {selection.protect_general}")
    diff = _normalized(general, selection.normalize) - _normalized(toxic, selection.normalize)
    if selection.protect_general > 0:
        flat = general.abs().flatten()
        k = int(round(selection.protect_general * flat.numel()))
        if k:
            protected = torch.zeros_like(flat, dtype=torch.bool)
            protected[flat.topk(k).indices] = True
            diff = torch.where(protected.view_as(diff), torch.full_like(diff, float("inf")), diff)
    return diff


@dataclass(frozen=True)
class Neuron:
    layer: int
    index: int
    score: float | None  # the differential score; None for the random control


def select(diff: torch.Tensor, k: int) -> list[Neuron]:
    """The ``k`` neurons with the lowest differential score (most specific to the toxic set)."""
    selectable = int(torch.isfinite(diff).sum())
    if k <= 0:
        raise SparcError(f"the number of neurons to prune must be positive, got {k}")
    if k > selectable:
        raise SparcError(f"cannot prune {k} neurons: the model has {diff.numel()} and {selectable} may be selected",
                         "lower k (or protect_general)")
    # stable sort: equal scores keep index order, so the same scores give the same neurons
    order = torch.sort(diff.flatten(), stable=True).indices[:k]
    d_ff = diff.shape[1]
    return [Neuron(int(i) // d_ff, int(i) % d_ff, float(diff.flatten()[i])) for i in order]


def random_neurons(shape: tuple[int, int], k: int, seed: int = 0) -> list[Neuron]:
    """A control: ``k`` neurons drawn uniformly without replacement."""
    layers, d_ff = shape
    if not 0 < k <= layers * d_ff:
        raise SparcError(f"cannot draw {k} random neurons from {layers * d_ff}")
    g = torch.Generator().manual_seed(seed)
    flat = torch.randperm(layers * d_ff, generator=g)[:k]
    return [Neuron(int(i) // d_ff, int(i) % d_ff, None) for i in flat]


class Pruned:
    """Zero the selected neurons in place; ``restore()`` (or leaving the ``with`` block) undoes it exactly.

    A neuron j of layer l is removed by zeroing up_proj row j, gate_proj row j and down_proj column j,
    so its output act(gate_j)·up_j is 0 and it writes nothing to the residual stream.
    """

    def __init__(self, model: torch.nn.Module, neurons: list[Neuron]):
        self.model, self.neurons, self._saved = model, neurons, []

    def apply(self) -> "Pruned":
        layers, d_ff = model_shape(self.model)
        mlps = mlp_layers(self.model)
        by_layer: dict[int, list[int]] = {}
        for n in self.neurons:
            if not (0 <= n.layer < layers and 0 <= n.index < d_ff):
                raise SparcError(f"neuron (layer {n.layer}, index {n.index}) does not exist in a "
                                 f"{layers} x {d_ff} model", "use a neurons file made for this model")
            by_layer.setdefault(n.layer, []).append(n.index)
        with torch.no_grad():
            for layer, idx in by_layer.items():
                mlp, i = mlps[layer], torch.tensor(sorted(set(idx)))
                saved = (i, mlp.up_proj.weight[i].clone(), mlp.gate_proj.weight[i].clone(),
                         mlp.down_proj.weight[:, i].clone())
                self._saved.append((layer, saved))
                mlp.up_proj.weight[i] = 0
                mlp.gate_proj.weight[i] = 0
                mlp.down_proj.weight[:, i] = 0
        return self

    def restore(self) -> None:
        mlps = mlp_layers(self.model)
        with torch.no_grad():
            for layer, (i, up, gate, down) in reversed(self._saved):
                mlps[layer].up_proj.weight[i] = up
                mlps[layer].gate_proj.weight[i] = gate
                mlps[layer].down_proj.weight[:, i] = down
        self._saved.clear()

    def __enter__(self) -> "Pruned":
        return self.apply()

    def __exit__(self, *exc) -> None:
        self.restore()


def write_neurons(path: str | Path, neurons: list[Neuron], **info) -> None:
    write_json(path, {**info, "k": len(neurons), "neurons": [asdict(n) for n in neurons]})


def read_neurons(path: str | Path) -> tuple[dict, list[Neuron]]:
    path = Path(path)
    if not path.is_file():
        raise SparcError(f"neurons file {path} does not exist", "run `sparc prune` first")
    try:
        data = json.loads(path.read_text())
        neurons = [Neuron(int(n["layer"]), int(n["index"]), None if n.get("score") is None else float(n["score"]))
                   for n in data["neurons"]]
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise SparcError(f"{path} is not a valid neurons file ({type(e).__name__})",
                         "give a neurons.json written by `sparc prune`") from None
    return data, neurons
