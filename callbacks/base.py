"""The contract between the attribution loop and an attribution method.

The engine calls these hooks through ``fabric.call`` (so a hook may take any subset of the keyword
arguments). A user adds a method by subclassing ``AttributionCallback`` and naming the class in YAML
(``class_path``); the engine needs no change.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sparc_engine.scores import NeuronScores


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, T], right-padded
    attention_mask: torch.Tensor  # [B, T] 1 for real tokens
    target_mask: torch.Tensor  # [B, T] 1 where the logit of the next token is explained
    sample_weight: torch.Tensor  # [B] 0 for padding samples that keep ranks in step


class AttributionCallback:
    """Base class: accumulate fp32 per-neuron state in the hooks, reduce it across ranks, make scores."""

    method: str = "custom"
    needs_backward: bool = False
    reduction: str = "sum"

    def on_attribution_start(self, model: torch.nn.Module) -> None:
        """Register hooks on ``model`` (the underlying Hugging Face model) and allocate accumulators."""

    def on_batch_start(self, batch: Batch) -> None:
        """Called before the forward pass of ``batch``."""

    def on_batch_end(self, batch: Batch) -> None:
        """Called after the forward (and, where needed, backward) pass of ``batch``."""

    def on_attribution_end(self, model: torch.nn.Module) -> None:
        """Remove hooks."""

    def reduce(self, fabric) -> None:
        """Sum the accumulators across ranks (every rank calls it)."""
        for key, value in self.state_dict().items():
            if isinstance(value, torch.Tensor):
                self.state_dict()[key].copy_(fabric.all_reduce(value, reduce_op="sum"))

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The accumulators: what a checkpoint saves and ``reduce`` sums."""
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for key, value in state.items():
            self.state_dict()[key].copy_(value)

    def scores(self, model: torch.nn.Module, samples: int, tokens: int, meta: dict) -> NeuronScores:
        """The finished scores of the whole reference set (after ``reduce``)."""
        raise NotImplementedError


class NeuronHooks:
    """Forward hooks on every layer's ``mlp.<name>``, removed together."""

    def __init__(self):
        self.handles = []

    def add(self, model: torch.nn.Module, name: str, fn) -> None:
        from sparc_engine.models import mlp_layers

        for layer, mlp in enumerate(mlp_layers(model)):
            module = getattr(mlp, name)
            self.handles.append(module.register_forward_hook(lambda m, i, o, layer=layer: fn(layer, m, i, o)))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
