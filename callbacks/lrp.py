"""LRP neuron relevance with lxt's efficient (Gradient x Input) rules.

Relevance of up_proj neuron j in one sample is ``Σ_t z_j(t) · ĝ_j(t)``, where ``z`` is the up_proj
output and ``ĝ`` the LRP-modified gradient. Llama's up_proj has no bias, so this equals the row sum
of the per-weight relevance ``w_ji · ∂/∂w_ji`` (DESIGN.md §1): exact, with every parameter frozen.
"""

from __future__ import annotations

from typing import Literal

import torch

from callbacks.base import AttributionCallback, Batch, NeuronHooks
from sparc_engine.models import mlp_layers, model_shape
from sparc_engine.scores import NeuronScores


class LRPAttribution(AttributionCallback):
    method = "lrp"
    needs_backward = True

    def __init__(self, per_weight: bool = False, target: Literal["logit", "logprob"] = "logit"):
        """Signed LRP relevance per up_proj neuron, summed over samples.

        Args:
            target: what is explained at each target position: ``logit`` (lxt's convention, the
                paper's) or ``logprob`` (log p of the token: also what the neuron does to competing
                tokens; needs full-vocabulary logits at the target positions).
            per_weight: instead, sum |w ⊙ ∇w| over each up_proj row (the seed project's form). Needs
                up_proj weight gradients (more memory); the absolute value is taken per batch, so use
                batch_size 1 for per-sample absolute values.
        """
        self.per_weight, self.target = per_weight, target
        self.method = "lrp" + ("-per-weight" if per_weight else "") + ("-logprob" if target == "logprob" else "")
        self.hooks = NeuronHooks()
        self._weights = None

    def on_attribution_start(self, model: torch.nn.Module) -> None:
        layers, d_ff = model_shape(model)
        device = next(model.parameters()).device
        self.sums = torch.zeros(layers, d_ff, dtype=torch.float32, device=device)
        self.nonfinite = torch.zeros((), dtype=torch.float64, device=device)
        if self.per_weight:
            self._weights = [m.up_proj.weight for m in mlp_layers(model)]
            for w in self._weights:
                w.requires_grad_(True)
        else:
            self.hooks.add(model, "up_proj", self._on_up_proj)

    def on_batch_start(self, batch: Batch) -> None:
        self._weight = batch.sample_weight

    def _on_up_proj(self, layer: int, module, inputs, output: torch.Tensor) -> None:
        if output.requires_grad:
            z = output.detach()  # the hook must not hold `output` itself: that cycle would outlive the batch
            output.register_hook(lambda grad: self._accumulate(layer, z, grad))

    def _accumulate(self, layer: int, z: torch.Tensor, grad: torch.Tensor) -> None:
        # Σ_t z·ĝ per sample in fp32; pad positions carry zero gradient (right padding, causal model).
        per_sample = torch.sum(z * grad, dim=1, dtype=torch.float32)  # [B, d_ff]
        self._add(layer, per_sample)

    def _add(self, layer: int, per_sample: torch.Tensor) -> None:
        # NaN/Inf are counted and kept out of the sum, never silently zeroed: the run reports and
        # checks them. No `if` on the tensor: that would make the host wait for the GPU every layer.
        finite = torch.isfinite(per_sample)
        weight = self._weight.to(per_sample.dtype)[:, None]
        self.nonfinite += (~finite & (weight > 0)).sum()
        self.sums[layer] += (torch.where(finite, per_sample, 0.0) * weight).sum(0)

    def on_batch_end(self, batch: Batch) -> None:
        if not self.per_weight:
            return
        for layer, w in enumerate(self._weights):
            if w.grad is not None:
                self._add(layer, (w.detach() * w.grad).abs().sum(1, dtype=torch.float32)[None])
                w.grad = None

    def on_attribution_end(self, model: torch.nn.Module) -> None:
        self.hooks.remove()
        for w in self._weights or []:
            w.requires_grad_(False)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"sums": self.sums, "nonfinite": self.nonfinite}

    def scores(self, model, samples: int, tokens: int, meta: dict) -> NeuronScores:
        return NeuronScores(values=self.sums, method=self.method, reduction="sum", samples=samples,
                            tokens=tokens, nonfinite=int(self.nonfinite.item()), meta=meta)
