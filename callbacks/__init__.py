"""Attribution callbacks: each turns the engine's forward (and backward) passes into neuron scores."""

from callbacks.base import AttributionCallback, Batch
from callbacks.lrp import LRPAttribution
from callbacks.monitor import RelevanceMonitor
from callbacks.wanda import WandaAttribution

__all__ = ["AttributionCallback", "Batch", "LRPAttribution", "RelevanceMonitor", "WandaAttribution"]
