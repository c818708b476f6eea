import torch
import pytest
from lightning.fabric import Fabric

from callbacks import LRPAttribution, WandaAttribution
from sparc_engine.data import Embedded
from sparc_engine.engine import attribute_set, collate, forward_backward, prepare_samples
from sparc_engine.errors import SparcError
from sparc_engine.models import load_model, mlp_layers
from sparc_engine.scores import NeuronScores, average, check_finite
from tests.conftest import one_line_error, sparc

SOURCE = Embedded("general", limit=6)


def run(loaded, callbacks, source=SOURCE, seq_len=64, batch_size=4):
    fabric = Fabric(accelerator="cpu", devices=1, callbacks=callbacks)
    return attribute_set(fabric, loaded, source, callbacks, seq_len=seq_len, batch_size=batch_size)


def test_lrp_neuron_relevance_equals_weight_relevance_row_sums(tiny):
    scores = run(tiny, [LRPAttribution()])["lrp"]
    fabric = Fabric(accelerator="cpu", devices=1)
    samples, _ = prepare_samples(fabric, tiny, SOURCE, 64, 20, 4)
    weights = [m.up_proj.weight for m in mlp_layers(tiny.model)]
    try:
        for w in weights:
            w.requires_grad_(True)
        for i in range(len(samples)):
            forward_backward(tiny.model, collate(samples, [i], tiny.tokenizer.pad_token_id, "cpu"), backward=True)
        row_sums = torch.stack([(w * w.grad).sum(1) for w in weights]).detach()
    finally:
        for w in weights:
            w.requires_grad_(False)
            w.grad = None
    assert scores.samples == 6 and scores.values.abs().max() > 0
    torch.testing.assert_close(scores.values, row_sums, rtol=1e-4, atol=1e-4 * row_sums.abs().max().item())


def test_lrp_relevance_does_not_depend_on_batching(tiny):
    one = run(tiny, [LRPAttribution()], batch_size=1)["lrp"]
    four = run(tiny, [LRPAttribution()], batch_size=4)["lrp"]
    torch.testing.assert_close(one.values, four.values, rtol=1e-4, atol=1e-4 * one.values.abs().max().item())


def test_prompt_sets_explain_the_generated_continuation(tiny):
    scores = run(tiny, [LRPAttribution()], source=Embedded("toxic", limit=3))["lrp"]
    assert len(scores.meta["continuations"]) == 3
    assert scores.meta["kind"] == "prompts"


def test_wanda_equals_weight_times_input_norm(tiny):
    scores = run(tiny, [WandaAttribution()], batch_size=4)["wanda"]
    fabric = Fabric(accelerator="cpu", devices=1)
    samples, _ = prepare_samples(fabric, tiny, SOURCE, 64, 20, 4)
    inputs = {l: [] for l in range(3)}
    hooks = [m.up_proj.register_forward_hook(lambda mod, i, o, l=l: inputs[l].append(i[0][0]))
             for l, m in enumerate(mlp_layers(tiny.model))]
    with torch.no_grad():
        for s in samples:
            tiny.model(torch.tensor([s.ids]))
    for h in hooks:
        h.remove()
    for l, m in enumerate(mlp_layers(tiny.model)):
        x = torch.cat(inputs[l])  # all tokens of all samples, then the norm
        direct = (m.up_proj.weight.abs() * x.norm(dim=0)[None]).sum(1)
        torch.testing.assert_close(scores.values[l], direct, rtol=1e-5, atol=1e-6)


def test_two_cpu_processes_equal_one(tmp_path):
    common = ["--model", "random:tiny", "--data.class_path", "sparc_engine.data.Embedded",
              "--data.init_args.limit", "7", "--seq_len", "48", "--batch_size", "2", "--fabric.accelerator", "cpu"]
    one = sparc("attribute", *common, "--out_dir", tmp_path / "one")
    assert one.returncode == 0, one.stderr[-3000:]
    two = sparc("attribute", *common, "--out_dir", tmp_path / "two", "--fabric.devices", "2",
                "--fabric.strategy", "ddp")
    assert two.returncode == 0, two.stderr[-3000:]
    for method in ("lrp", "wanda"):
        a = NeuronScores.load(tmp_path / "one" / f"scores.{method}.safetensors")
        b = NeuronScores.load(tmp_path / "two" / f"scores.{method}.safetensors")
        assert (a.samples, a.tokens) == (b.samples, b.tokens) == (7, a.tokens)
        assert b.meta["world_size"] == 2
        torch.testing.assert_close(a.values, b.values, rtol=1e-5, atol=1e-5 * a.values.abs().max().item())


@pytest.fixture(scope="module")
def nan_model_dir(tmp_path_factory, tiny):
    path = tmp_path_factory.mktemp("nan_model")
    model = load_model("random:tiny", lrp=True).model
    with torch.no_grad():
        mlp_layers(model)[2].up_proj.weight[5] = float("nan")
    model.save_pretrained(path)
    tiny.tokenizer.save_pretrained(path)
    return path


def test_nonfinite_relevance_is_counted_and_fails_the_run(nan_model_dir, tmp_path):
    common = ["--model", nan_model_dir, "--data.class_path", "sparc_engine.data.Embedded",
              "--data.init_args.limit", "3", "--seq_len", "32", "--fabric.accelerator", "cpu",
              "--callbacks+=callbacks.LRPAttribution"]
    failed = sparc("attribute", *common, "--out_dir", tmp_path / "strict")
    assert "NaN/Inf" in one_line_error(failed)
    assert "NaN/Inf neuron contributions" in failed.stderr  # surfaced in the log
    assert not (tmp_path / "strict" / "scores.lrp.safetensors").exists()
    allowed = sparc("attribute", *common, "--out_dir", tmp_path / "lenient", "--max_nonfinite_share", "1")
    assert allowed.returncode == 0, allowed.stderr[-2000:]
    scores = NeuronScores.load(tmp_path / "lenient" / "scores.lrp.safetensors")
    assert scores.nonfinite == 3 * 3 * 96  # every (sample, neuron) contribution
    assert torch.isfinite(scores.values).all()


def test_scores_roundtrip_and_model_check(tiny, tmp_path):
    scores = run(tiny, [LRPAttribution()])["lrp"]
    scores.save(tmp_path / "s.safetensors")
    loaded = NeuronScores.load(tmp_path / "s.safetensors")
    assert torch.equal(loaded.values, scores.values)
    assert loaded.meta["model_fingerprint"] == scores.meta["model_fingerprint"]
    assert (loaded.samples, loaded.tokens, loaded.method) == (6, scores.tokens, "lrp")
    loaded.check_model(tiny.model)
    other = load_model("random:tiny").model
    with torch.no_grad():
        other.model.layers[0].self_attn.q_proj.weight.add_(1.0)
    with pytest.raises(SparcError, match="another model"):
        loaded.check_model(other)
    data = (tmp_path / "s.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(SparcError, match="corrupted or truncated"):
        NeuronScores.load(tmp_path / "cut.safetensors")


def test_merge_is_exact_and_average_weights_sets_equally():
    a = NeuronScores(torch.tensor([[2.0, 4.0]]), "lrp", samples=2, tokens=10)
    b = NeuronScores(torch.tensor([[6.0, 0.0]]), "lrp", samples=6, tokens=30)
    merged = a.merge(b)
    assert merged.samples == 8 and torch.equal(merged.mean(), torch.tensor([[1.0, 0.5]]))
    assert torch.equal(average([a, b]).mean(), torch.tensor([[1.0, 1.0]]))
    with pytest.raises(SparcError):
        a.merge(NeuronScores(torch.zeros(1, 3), "lrp", samples=1))
    with pytest.raises(SparcError):
        check_finite(NeuronScores(torch.zeros(1, 2), "lrp", samples=1, nonfinite=1), 0.0)


def test_toxic_continuations_can_be_sampled_and_filtered(tiny):
    from sparc_engine.engine import Continuations
    from sparc_engine.toxicity import ProfanityCheck

    source, fabric = Embedded("toxic", limit=3), Fabric(accelerator="cpu", devices=1)
    every = Continuations(samples=2, keep_threshold=0.0)
    samples, texts = prepare_samples(fabric, tiny, source, 64, 5, 4, every, ProfanityCheck())
    assert len(samples) == len(texts) == 6  # 2 sampled continuations of each of the 3 prompts
    assert all(s.first_target < len(s.ids) for s in samples)
    scorer = ProfanityCheck()
    threshold = sorted(scorer.score(texts))[3]  # keeps the continuations rated at least this toxic
    kept, kept_texts = prepare_samples(fabric, tiny, source, 64, 5, 4, Continuations(2, keep_threshold=threshold),
                                       scorer)
    assert 1 <= len(kept) <= 3 and set(kept_texts) <= set(texts)
    with pytest.raises(SparcError, match="no continuation"):
        prepare_samples(fabric, tiny, source, 64, 5, 4, Continuations(2, keep_threshold=1.01), scorer)


def test_callbacks_with_different_targets_run_as_separate_passes(tiny):
    both = run(tiny, [LRPAttribution(), LRPAttribution(target="logprob"), WandaAttribution()])
    assert set(both) == {"lrp", "lrp-logprob", "wanda"}
    alone = run(tiny, [LRPAttribution()])["lrp"]
    torch.testing.assert_close(both["lrp"].values, alone.values, rtol=1e-6, atol=0)
    assert both["lrp-logprob"].meta["target"] == "logprob" and both["lrp"].meta["target"] == "logit"
    assert not torch.allclose(both["lrp"].values, both["lrp-logprob"].values)
