"""`sparc run` end to end on the tiny random Llama: every output a reviewer reads exists and is consistent."""

import json

from tests.conftest import sparc


def test_run_writes_report_metrics_plots_and_neurons(tmp_path):
    out = tmp_path / "run"
    proc = sparc("run", "--model", "random:tiny", "--fabric.accelerator", "cpu", "--seq_len", "32",
                 "--general.init_args.limit", "4", "--toxic.init_args.limit", "4",
                 "--perplexity_data.init_args.limit", "2", "--eval_prompts.init_args.limit", "4",
                 "--k", "5", "--sweep", "[3, 10]", "--evaluation.k", "2", "--evaluation.max_new_tokens", "4",
                 "--evaluation.seq_len", "64", "--evaluation.bootstrap", "50", "--out_dir", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"report: {out / 'report.md'}" in proc.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    rows = metrics["rows"]
    kinds = {(r["method"], r["kind"], r["k"]) for r in rows}
    for method in ("lrp-logprob", "wanda"):  # run's default methods
        assert {(method, "targeted", k) for k in (3, 5, 10)} <= kinds
        assert (method, "paper", 5) in kinds
        assert set(metrics["bar"]) >= {method, f"{method} (paper)"}
    assert ("random", "random", 5) in kinds and ("none", "baseline", 0) in kinds
    baseline = next(r for r in rows if r["kind"] == "baseline")
    for r in rows:
        if r["kind"] != "baseline":
            expected = 100 * (r["perplexity"] - baseline["perplexity"]) / baseline["perplexity"]
            assert abs(r["perplexity_change_pct"] - expected) < 1e-9
    report = (out / "report.md").read_text()
    assert "| baseline |" in report and "random control" in report and "The bar" in report
    for plot in ("toxicity_vs_k", "perplexity_vs_k", "relevance_per_layer"):
        assert (out / "plots" / f"{plot}.png").stat().st_size > 1000
    for name in metrics["neurons_files"]:
        assert len(json.loads((out / name).read_text())["neurons"]) == 5
    assert list((out / "tensorboard").rglob("events.out.tfevents*"))
    # a finished run is not overwritten by accident
    again = sparc("run", "--model", "random:tiny", "--out_dir", out)
    assert again.returncode == 2 and "already exists" in again.stderr
