"""sparc_engine: attribution-guided pruning (SparC³) of the neurons that drive unwanted behaviour in Llama models."""

__version__ = "0.1.0"
