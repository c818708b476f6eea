import json

import pytest
import torch

from sparc_engine.errors import SparcError
from sparc_engine.models import load_model, mlp_layers
from sparc_engine.pruning import (Neuron, Pruned, Selection, differential, random_neurons, read_neurons, select,
                                  write_neurons)
from sparc_engine.report import bar_check
from tests.conftest import one_line_error, sparc

G = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, -2.0]])
T = torch.tensor([[0.0, 4.0, 1.0], [1.0, 3.0, 0.0]])


def test_paper_differential_is_plain_difference():
    assert torch.equal(differential(G, T, Selection.paper()), G - T)


def test_l1_and_max_normalisation():
    l1 = differential(G, T, Selection("l1", 0.0))
    torch.testing.assert_close(l1, G / 12 - T / 9)
    mx = differential(G, T, Selection("max", 0.0))
    torch.testing.assert_close(mx, G / 4 - T / 4)


def test_protection_excludes_top_general_neurons():
    # top 1/3 of |general| (2 of 6 neurons): (1,0)=4 and (0,2)=3
    d = differential(G, T, Selection("none", 1 / 3))
    assert torch.isinf(d[1, 0]) and torch.isinf(d[0, 2])
    assert [(n.layer, n.index) for n in select(d, 4)] == [(1, 1), (0, 1), (1, 2), (0, 0)]
    with pytest.raises(SparcError, match="may be selected"):
        select(d, 5)


def test_select_orders_by_lowest_differential_and_checks_k():
    d = G - T  # [[1,-2,2],[3,-3,-2]]
    assert [(n.layer, n.index, n.score) for n in select(d, 3)] == [(1, 1, -3.0), (0, 1, -2.0), (1, 2, -2.0)]
    with pytest.raises(SparcError, match="positive"):
        select(d, 0)
    with pytest.raises(SparcError, match="cannot prune 7"):
        select(d, 7)


def test_differential_refuses_nan_and_shape_mismatch():
    with pytest.raises(SparcError, match="NaN"):
        differential(torch.tensor([[float("nan")]]), torch.zeros(1, 1), Selection())
    with pytest.raises(SparcError, match="shape"):
        differential(torch.zeros(1, 2), torch.zeros(2, 1), Selection())


def test_random_control_is_seeded_and_unique():
    a, b = random_neurons((4, 10), 12, seed=3), random_neurons((4, 10), 12, seed=3)
    assert a == b and len({(n.layer, n.index) for n in a}) == 12
    assert a != random_neurons((4, 10), 12, seed=4)


def test_pruning_zeroes_exact_slices_and_restores():
    model = load_model("random:tiny").model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    neurons = [Neuron(0, 5, 0.0), Neuron(2, 7, 0.0), Neuron(2, 90, 0.0)]
    with Pruned(model, neurons):
        after = model.state_dict()
        changed = {k for k in before if not torch.equal(before[k], after[k])}
        assert changed == {f"model.layers.{l}.mlp.{p}.weight" for l in (0, 2) for p in ("up_proj", "gate_proj",
                                                                                           "down_proj")}
        for n in neurons:
            mlp = mlp_layers(model)[n.layer]
            assert not mlp.up_proj.weight[n.index].any() and not mlp.gate_proj.weight[n.index].any()
            assert not mlp.down_proj.weight[:, n.index].any()
        # everything else untouched
        up = mlp_layers(model)[2].up_proj.weight
        keep = [i for i in range(up.shape[0]) if i not in (7, 90)]
        assert torch.equal(up[keep], before["model.layers.2.mlp.up_proj.weight"][keep])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_pruned_neurons_contribute_nothing():
    """Pruning equals masking the neurons' activations act(gate)·up before down_proj."""
    model = load_model("random:tiny").model
    neurons = [Neuron(1, 3, 0.0), Neuron(1, 50, 0.0), Neuron(0, 11, 0.0)]
    ids = torch.arange(5, 37)[None]
    masks = {}
    for n in neurons:
        masks.setdefault(n.layer, []).append(n.index)

    def zero_inputs(layer):
        def hook(module, args):
            x = args[0].clone()
            x[..., masks[layer]] = 0
            return (x,)
        return hook

    handles = [mlp_layers(model)[l].down_proj.register_forward_pre_hook(zero_inputs(l)) for l in masks]
    with torch.no_grad():
        masked = model(ids).logits
    for h in handles:
        h.remove()
    with torch.no_grad(), Pruned(model, neurons):
        pruned = model(ids).logits
        # and the pruned neurons' activations really are 0
        seen = {}
        h = mlp_layers(model)[1].down_proj.register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0]))
        model(ids)
        h.remove()
    torch.testing.assert_close(pruned, masked, rtol=1e-5, atol=1e-5)
    assert not seen["x"][..., [3, 50]].any()


def test_pruning_refuses_neurons_outside_the_model():
    model = load_model("random:tiny").model
    with pytest.raises(SparcError, match="does not exist"):
        Pruned(model, [Neuron(3, 0, 0.0)]).apply()


def test_neurons_file_roundtrip(tmp_path):
    write_neurons(tmp_path / "n.json", [Neuron(1, 2, -0.5)], model="m", method="lrp")
    info, neurons = read_neurons(tmp_path / "n.json")
    assert info["k"] == 1 and info["method"] == "lrp" and neurons == [Neuron(1, 2, -0.5)]
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(SparcError, match="not a valid neurons file"):
        read_neurons(tmp_path / "bad.json")


def test_bar_check_formula():
    chosen = {"toxicity_change_pct": -30.0, "perplexity_change_pct": 1.5}
    control = {"toxicity_change_pct": -5.0, "perplexity_change_pct": 1.0}
    bar = bar_check(chosen, control)
    assert bar["cut_vs_control"] == pytest.approx(6.0) and bar["meets_bar"]
    assert not bar_check({"toxicity_change_pct": -30.0, "perplexity_change_pct": 2.5}, control)["meets_bar"]
    assert not bar_check({"toxicity_change_pct": -12.0, "perplexity_change_pct": 0.0}, control)["meets_bar"]


def test_run_refuses_evaluating_on_attribution_prompts(tmp_path):
    proc = sparc("run", "--model", "random:tiny", "--eval_prompts.init_args.split", "attribution",
                 "--out_dir", tmp_path)
    assert "same set" in one_line_error(proc)
    assert not (tmp_path / "metrics.json").exists()


def test_prune_and_evaluate_commands(tmp_path):
    common = ["--model", "random:tiny", "--seq_len", "32", "--fabric.accelerator", "cpu"]
    for tag, split in [("general", "general"), ("toxic", "toxic")]:
        proc = sparc("attribute", *common, "--data.init_args.set", split, "--data.init_args.limit", "4",
                     "--out_dir", tmp_path / tag)
        assert proc.returncode == 0, proc.stderr[-2000:]
    out = tmp_path / "neurons.json"
    proc = sparc("prune", "--general", f"[{tmp_path / 'general' / 'scores.lrp.safetensors'}]",
                 "--toxic", f"[{tmp_path / 'toxic' / 'scores.lrp.safetensors'}]", "--k", "10", "--out", out,
                 "--model", "random:tiny", "--save_model", tmp_path / "pruned")
    assert proc.returncode == 0, proc.stderr[-2000:]
    info = json.loads(out.read_text())
    assert info["k"] == 10 and len(info["neurons"]) == 10 and info["method"] == "lrp"
    pruned = load_model(str(tmp_path / "pruned")).model
    n = info["neurons"][0]
    assert not mlp_layers(pruned)[n["layer"]].up_proj.weight[n["index"]].any()
    # mixed methods need an explicit override; too many neurons is refused
    mixed = sparc("prune", "--general", f"[{tmp_path / 'general' / 'scores.lrp.safetensors'}]",
                  "--toxic", f"[{tmp_path / 'toxic' / 'scores.wanda.safetensors'}]", "--out", tmp_path / "m.json")
    assert "--allow_method_mismatch" in one_line_error(mixed)
    too_many = sparc("prune", "--general", f"[{tmp_path / 'general' / 'scores.lrp.safetensors'}]",
                     "--toxic", f"[{tmp_path / 'toxic' / 'scores.lrp.safetensors'}]", "--k", "100000",
                     "--out", tmp_path / "t.json")
    assert "cannot prune 100000" in one_line_error(too_many)
    assert not (tmp_path / "m.json").exists() and not (tmp_path / "t.json").exists()
    ev = sparc("evaluate", "--model", "random:tiny", "--neurons", out, "--perplexity_data.init_args.limit", "2",
               "--prompts.init_args.limit", "3", "--settings.k", "2", "--settings.max_new_tokens", "4",
               "--settings.seq_len", "64", "--out", tmp_path / "metrics.json")
    assert ev.returncode == 0, ev.stderr[-2000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["k"] == 10 and metrics["toxicity"]["n_prompts"] == 3 and metrics["perplexity"]["perplexity"] > 1
    same = sparc("evaluate", "--model", "random:tiny", "--neurons", out, "--prompts.init_args.split", "attribution",
                 "--out", tmp_path / "same.json")
    assert "held-out" in one_line_error(same)
