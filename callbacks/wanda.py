"""Wanda neuron scores: |W|·‖X‖₂ for up_proj, from one forward pass.

Per input feature i, ``Σ_t x_i(t)²`` is accumulated in fp32 over every real token of every sample
(the norm of the concatenated inputs); the score of neuron j is ``Σ_i |W_ji|·‖X_i‖₂``.
"""

from __future__ import annotations

import torch

from callbacks.base import AttributionCallback, Batch, NeuronHooks
from sparc_engine.models import mlp_layers
from sparc_engine.scores import NeuronScores


class WandaAttribution(AttributionCallback):
    method = "wanda"
    needs_backward = False
    reduction = "score"

    def __init__(self):
        """Wanda (Sun et al. 2023) importance of each up_proj neuron; forward only."""
        self.hooks = NeuronHooks()

    def on_attribution_start(self, model: torch.nn.Module) -> None:
        mlps = mlp_layers(model)
        device = next(model.parameters()).device
        self.sq_sums = torch.zeros(len(mlps), mlps[0].up_proj.in_features, dtype=torch.float32, device=device)
        self.hooks.add(model, "up_proj", self._on_up_proj)

    def on_batch_start(self, batch: Batch) -> None:
        # real tokens of real samples; None when every position counts (no copy needed then)
        mask = batch.attention_mask.bool() & (batch.sample_weight[:, None] > 0)
        self._mask = None if bool(mask.all()) else mask

    def _on_up_proj(self, layer: int, module, inputs, output) -> None:
        x = inputs[0]
        x = x.reshape(-1, x.shape[-1]) if self._mask is None else x[self._mask]
        self.sq_sums[layer] += torch.linalg.vector_norm(x, ord=2, dim=0, dtype=torch.float32).square()

    def on_attribution_end(self, model: torch.nn.Module) -> None:
        self.hooks.remove()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"sq_sums": self.sq_sums}

    def scores(self, model, samples: int, tokens: int, meta: dict) -> NeuronScores:
        norms = self.sq_sums.sqrt()
        values = torch.stack([m.up_proj.weight.detach().abs().float() @ norms[layer]
                              for layer, m in enumerate(mlp_layers(model))])
        nonfinite = int((~torch.isfinite(values)).sum())
        return NeuronScores(values=values, method=self.method, reduction="score", samples=samples,
                            tokens=tokens, nonfinite=nonfinite, meta=meta)
