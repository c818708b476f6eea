"""Perplexity against direct computations, toxicity metrics against hand-computed values, scorers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sparc_engine.data import Embedded
from sparc_engine.errors import SparcError
from sparc_engine.evaluation import (bootstrap_ci, perplexity, perplexity_windows, toxicity,
                                     toxicity_metrics)
from sparc_engine.models import load_model
from sparc_engine.toxicity import Detoxify, ProfanityCheck, get_scorer


@pytest.fixture(scope="module")
def tiny():
    return load_model("random:tiny")


@pytest.fixture(scope="module")
def documents(tiny):
    # real text of different lengths, plus a document shorter than a window and one with nothing to score
    docs = Embedded("general", "validation", limit=3).documents(tiny.tokenizer)
    return docs + [docs[0][:37], docs[1][:1]]


@torch.no_grad()
def direct_nll(model, ids: list[int]) -> tuple[float, int]:
    """Sum of next-token cross entropy over one sequence in a single forward pass, and the token count."""
    if len(ids) < 2:
        return 0.0, 0
    x = torch.tensor([ids])
    logits = model(x).logits[0, :-1].float()
    return F.cross_entropy(logits, x[0, 1:], reduction="sum").item(), len(ids) - 1


@torch.no_grad()
def hf_protocol_nll(model, ids: list[int], max_length: int, stride: int) -> tuple[float, int]:
    """The loop of the Hugging Face guide "Perplexity of fixed-length models", labels masked with -100."""
    nll_sum, n_tokens, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + max_length, len(ids))
        trg_len = end - prev_end
        input_ids = torch.tensor([ids[begin:end]])
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        labels = target_ids[0, 1:]
        if (labels != -100).any():
            logits = model(input_ids).logits[0, :-1].float()
            nll_sum += F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum").item()
            n_tokens += int((labels != -100).sum())
        prev_end = end
        if end == len(ids):
            break
    return nll_sum, n_tokens


def test_perplexity_non_overlapping_equals_direct_per_window(tiny, documents):
    seq_len = 64
    nll, tokens = 0.0, 0
    for doc in documents:
        for start in range(0, len(doc), seq_len):
            window_nll, window_tokens = direct_nll(tiny.model, doc[start:start + seq_len])
            nll, tokens = nll + window_nll, tokens + window_tokens
    result = perplexity(tiny.model, documents, seq_len=seq_len, batch_size=4, progress=False)
    assert result["tokens"] == tokens
    assert result["nll_sum"] == pytest.approx(nll, rel=1e-6)
    assert result["perplexity"] == pytest.approx(math.exp(nll / tokens), rel=1e-6)


def test_perplexity_whole_documents_when_seq_len_covers_them(tiny, documents):
    nll = sum(direct_nll(tiny.model, d)[0] for d in documents)
    tokens = sum(max(len(d) - 1, 0) for d in documents)
    result = perplexity(tiny.model, documents, seq_len=512, batch_size=8, progress=False)
    assert (result["tokens"], result["windows"]) == (tokens, 4)  # the 1-token document has no window
    assert result["nll_sum"] == pytest.approx(nll, rel=1e-6)


def test_perplexity_stride_matches_hugging_face_loop(tiny, documents):
    seq_len, stride = 64, 24
    nll, tokens = 0.0, 0
    for doc in documents:
        doc_nll, doc_tokens = hf_protocol_nll(tiny.model, doc, seq_len, stride)
        nll, tokens = nll + doc_nll, tokens + doc_tokens
    result = perplexity(tiny.model, documents, seq_len=seq_len, stride=stride, batch_size=8, progress=False)
    assert result["tokens"] == tokens == sum(max(len(d) - 1, 0) for d in documents)
    assert result["nll_sum"] == pytest.approx(nll, rel=1e-6)


def test_perplexity_does_not_depend_on_batch_size(tiny, documents):
    one = perplexity(tiny.model, documents, seq_len=48, stride=32, batch_size=1, progress=False)
    four = perplexity(tiny.model, documents, seq_len=48, stride=32, batch_size=4, progress=False)
    assert one["tokens"] == four["tokens"] and one["windows"] == four["windows"]
    assert four["perplexity"] == pytest.approx(one["perplexity"], rel=1e-6)


@pytest.mark.parametrize("n, seq_len, stride", [(10, 4, 2), (9, 4, 3), (5, 8, 1), (5, 8, 8), (1, 4, 2)])
def test_overlapping_windows_score_every_token_after_the_first_once(n, seq_len, stride):
    windows = perplexity_windows([n], seq_len, stride)
    scored = [t for w in windows for t in range(w.first_target, w.end)]
    assert sorted(scored) == list(range(1, n))
    assert all(w.end - w.begin <= seq_len and w.begin < w.first_target for w in windows)


def test_non_overlapping_windows_leave_each_window_start_unscored():
    # the first token of a window has no context inside it (HF protocol with stride = seq_len)
    windows = perplexity_windows([10, 1, 3], seq_len=4)
    assert [tuple(w) for w in windows] == [(0, 0, 4, 1), (0, 4, 8, 5), (0, 8, 10, 9), (2, 0, 3, 1)]


def test_perplexity_refuses_bad_input(tiny):
    with pytest.raises(SparcError, match="no tokens to score"):
        perplexity(tiny.model, [], seq_len=16, progress=False)
    with pytest.raises(SparcError, match="no tokens to score"):
        perplexity(tiny.model, [[5]], seq_len=16, progress=False)
    with pytest.raises(SparcError, match="stride"):
        perplexity(tiny.model, [[5, 6, 7]], seq_len=16, stride=32, progress=False)


def test_toxicity_metrics_hand_computed():
    metrics = toxicity_metrics(np.array([[0.1, 0.6], [0.2, 0.3]]))
    assert metrics["mean_toxicity"] == pytest.approx(0.3)
    assert metrics["expected_max_toxicity"] == pytest.approx(0.45)
    assert metrics["toxicity_probability"] == pytest.approx(0.5)
    # the threshold is inclusive
    assert toxicity_metrics(np.array([[0.5, 0.0]]))["toxicity_probability"] == 1.0


def test_bootstrap_ci_contains_estimate_and_is_seeded():
    scores = np.random.default_rng(1).beta(1, 4, size=(60, 5))
    for name, value in toxicity_metrics(scores).items():
        metric = lambda s, name=name: toxicity_metrics(s)[name]  # noqa: E731
        lo, hi = bootstrap_ci(scores, metric, n=500, seed=3)
        assert lo <= value <= hi and lo < hi
        assert bootstrap_ci(scores, metric, n=500, seed=3) == [lo, hi]
    mean = lambda s: toxicity_metrics(s)["mean_toxicity"]  # noqa: E731
    assert bootstrap_ci(scores, mean, n=500, seed=4) != bootstrap_ci(scores, mean, n=500, seed=3)
    assert bootstrap_ci(np.full((4, 2), 0.25), mean, n=50, seed=0) == pytest.approx([0.25, 0.25])


def test_profanity_check_ranks_profanity_above_neutral_text():
    profane, neutral = ProfanityCheck().score(["you are a fucking idiot, shut the hell up",
                                               "the library opens at nine on weekdays"])
    assert 0.0 <= neutral < profane <= 1.0
    assert profane > 0.5 > neutral


def test_profanity_check_batches_keep_order():
    texts = ["you stupid bitch", "a calm walk by the river", "what a damn moron", "tea with milk"]
    assert ProfanityCheck(batch_size=3).score(texts) == pytest.approx(ProfanityCheck().score(texts))


def test_get_scorer():
    assert isinstance(get_scorer("profanity-check"), ProfanityCheck)
    scorer = ProfanityCheck()
    assert get_scorer(scorer) is scorer
    with pytest.raises(SparcError, match="unknown toxicity scorer"):
        get_scorer("perspective")


def test_detoxify_missing_checkpoint_is_a_sparc_error(tmp_path):
    with pytest.raises(SparcError, match="cannot load the Detoxify model.*ProfanityCheck"):
        Detoxify(checkpoint=str(tmp_path / "missing.ckpt"))


def test_detoxify_unreadable_checkpoint_is_a_sparc_error(tmp_path):
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(SparcError, match="cannot load the Detoxify model"):
        Detoxify(checkpoint=str(bad))


def test_toxicity_on_tiny_model_is_deterministic(tiny):
    prompts = Embedded("toxic", "test", limit=3).texts()
    run = lambda: toxicity(tiny.model, tiny.tokenizer, prompts, ProfanityCheck(), k=2, max_new_tokens=5,  # noqa: E731
                           seed=7, batch_size=4, bootstrap=200, progress=False)
    first, second = run(), run()
    assert first == second
    assert (first["n_prompts"], first["k"], first["scorer"]) == (3, 2, "profanity-check")
    for name in ("mean_toxicity", "expected_max_toxicity", "toxicity_probability"):
        lo, hi = first[name]["ci95"]
        assert 0.0 <= lo <= first[name]["value"] <= hi <= 1.0
    assert first["expected_max_toxicity"]["value"] >= first["mean_toxicity"]["value"]
    samples = first["samples"]
    assert 1 <= len(samples) <= 5 and set(samples[0]) == {"prompt", "continuation", "score"}
    assert [s["score"] for s in samples] == sorted((s["score"] for s in samples), reverse=True)
    assert all(s["prompt"] in prompts for s in samples)


def test_toxicity_refuses_bad_input(tiny):
    with pytest.raises(SparcError, match="no prompts"):
        toxicity(tiny.model, tiny.tokenizer, [], "profanity-check", progress=False)
    with pytest.raises(SparcError, match="top_p"):
        toxicity(tiny.model, tiny.tokenizer, ["Hello"], "profanity-check", top_p=0.0, progress=False)
