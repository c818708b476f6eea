"""Toxicity scorers: text in, probability of toxic (0..1) out.

A scorer is a small class chosen in YAML the LightningCLI way (``class_path`` + ``init_args``):

    scorer:
      class_path: sparc_engine.toxicity.Detoxify
      init_args: {checkpoint: /models/toxic_original-c1212f89.ckpt}

``ProfanityCheck`` works offline (``alt-profanity-check`` ships its trained model) and is the
default; ``Detoxify`` is the scorer of the literature but needs a checkpoint file or the network.
"""

from __future__ import annotations

from pathlib import Path

from sparc_engine.errors import SparcError


class ToxicityScorer:
    """Base class: ``score`` splits the texts into batches of ``batch_size`` and calls ``score_batch``."""

    name: str = "scorer"
    batch_size: int = 32

    def score(self, texts: list[str]) -> list[float]:
        """Probability that each text is toxic, in the order given."""
        scores: list[float] = []
        for start in range(0, len(texts), self.batch_size):
            scores.extend(float(s) for s in self.score_batch(texts[start:start + self.batch_size]))
        return scores

    def score_batch(self, texts: list[str]) -> list[float]:
        raise NotImplementedError


class ProfanityCheck(ToxicityScorer):
    name = "profanity-check"

    def __init__(self, batch_size: int = 1024):
        """The ``alt-profanity-check`` classifier (a linear SVM on bag-of-words, trained model included, offline).

        It detects profanity and insults rather than toxicity in the broad Perspective sense, so its
        numbers are comparable between runs of this project, not with published Detoxify figures.

        Args:
            batch_size: texts per call of the classifier.
        """
        if batch_size < 1:
            raise SparcError(f"batch_size must be >= 1, got {batch_size}", "set ProfanityCheck batch_size to 1 or more")
        self.batch_size = batch_size

    def score_batch(self, texts: list[str]) -> list[float]:
        from profanity_check import predict_prob

        return predict_prob(texts).tolist()


DETOXIFY_MODEL_TYPES = ("original", "unbiased", "multilingual", "original-small", "unbiased-small")


class Detoxify(ToxicityScorer):
    def __init__(self, checkpoint: str | None = None, model_type: str = "original", device: str = "cpu",
                 batch_size: int = 32, huggingface_config_path: str | None = None):
        """Detoxify (Unitary) classifier; the score is its ``toxicity`` output.

        The model is loaded here, so a missing checkpoint stops the run before any work is done.

        Args:
            checkpoint: a local Detoxify checkpoint (``.ckpt`` with ``config`` and ``state_dict``);
                ``None`` downloads the ``model_type`` checkpoint from GitHub releases (needs the network).
            model_type: ``original``, ``unbiased``, ``multilingual``, ``original-small`` or ``unbiased-small``;
                used only when ``checkpoint`` is ``None``.
            device: where the classifier runs (``cpu``, ``cuda``, ``cuda:1``...).
            batch_size: texts per forward pass.
            huggingface_config_path: a local directory with the transformers config and tokenizer of the
                checkpoint's architecture (e.g. ``bert-base-uncased``), for fully offline loading;
                ``None`` fetches them from the hub (or its local cache).
        """
        if batch_size < 1:
            raise SparcError(f"batch_size must be >= 1, got {batch_size}", "set Detoxify batch_size to 1 or more")
        if checkpoint is None and model_type not in DETOXIFY_MODEL_TYPES:
            raise SparcError(f"unknown Detoxify model_type {model_type!r}",
                             f"use one of {', '.join(DETOXIFY_MODEL_TYPES)}")
        self.checkpoint, self.model_type, self.device = checkpoint, model_type, device
        self.batch_size, self.huggingface_config_path = batch_size, huggingface_config_path
        self.name = f"detoxify:{Path(checkpoint).name if checkpoint else model_type}"
        self._model = self._load()

    def _load(self):
        origin = f"checkpoint {self.checkpoint}" if self.checkpoint else f"{self.model_type!r} from the hub"
        fix = "give `checkpoint` to a local Detoxify checkpoint, or use the offline ProfanityCheck scorer"
        if self.checkpoint and not Path(self.checkpoint).expanduser().is_file():
            raise SparcError(f"cannot load the Detoxify model: {origin} does not exist", fix)
        try:
            import detoxify

            return detoxify.Detoxify(model_type=self.model_type,
                                     checkpoint=str(Path(self.checkpoint).expanduser()) if self.checkpoint else None,
                                     device=self.device, huggingface_config_path=self.huggingface_config_path)
        except Exception as e:  # network errors, corrupt files, unknown model_type (KeyError) all end here
            raise SparcError(f"cannot load the Detoxify model {origin} ({type(e).__name__})", fix) from e

    def score_batch(self, texts: list[str]) -> list[float]:
        scores = self._model.predict(texts)["toxicity"]
        # detoxify squeezes its output: one text gives a float, not a list
        return scores if isinstance(scores, list) else [scores]


SCORERS = {"profanity-check": ProfanityCheck, "detoxify": Detoxify}


def get_scorer(name_or_obj: str | ToxicityScorer) -> ToxicityScorer:
    """A scorer from its name (``profanity-check``, ``detoxify``) or an object that already has ``score``."""
    if isinstance(name_or_obj, str):
        if name_or_obj not in SCORERS:
            raise SparcError(f"unknown toxicity scorer {name_or_obj!r}", f"use one of {', '.join(SCORERS)}")
        return SCORERS[name_or_obj]()
    if not callable(getattr(name_or_obj, "score", None)):
        raise SparcError(f"{type(name_or_obj).__name__} is not a toxicity scorer (it has no `score` method)",
                         "use ProfanityCheck, Detoxify or a class with score(texts) -> list[float]")
    return name_or_obj
