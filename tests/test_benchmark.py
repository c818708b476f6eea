"""`python -m benchmarks.attribution` on the tiny random Llama: every pass is timed, ratios and
accumulator sizes are reported. No timing is asserted (the machine is shared)."""

import json
import subprocess
import sys

from benchmarks.attribution import PASSES
from tests.conftest import ROOT, one_line_error

TINY = ["--model", "random:tiny", "--seq_len", "32", "--batch_size", "2", "--batches", "1", "--repeats", "1",
        "--warmup", "1", "--prompts", "2", "--continuations", "2", "--gen_batch_size", "4",
        "--unbatched_sequences", "1", "--max_new_tokens", "4", "--ppl_windows", "2", "--ppl_batch_size", "2",
        "--progress", "false"]


def bench(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "benchmarks.attribution", *map(str, args)], capture_output=True,
                          text=True, cwd=ROOT, timeout=timeout)


def test_benchmark_reports_every_pass(tmp_path):
    out = tmp_path / "bench.json"
    proc = bench(*TINY, "--out", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "× forward" in proc.stdout and "target lrp" in proc.stdout and f"wrote {out}" in proc.stdout
    report = json.loads(out.read_text())

    assert list(report["passes"]) == list(PASSES)
    for name, r in report["passes"].items():
        assert r["seconds_per_batch"]["min"] > 0 and r["seconds_per_batch"]["median"] >= r["seconds_per_batch"]["min"], name
        assert r["tokens_per_s"]["median"] > 0 and r["seconds_per_1k_tokens"]["median"] > 0, name
        assert r["ratio_to_forward"]["median"] > 0 and r["ratio_to_forward"]["min"] > 0, name
        assert len(r["repeats"]) == 1 and r["tokens_per_repeat"] > 0, name
        assert r["memory"]["peak_mib"] > 0 and r["memory"]["increase_mib"] >= 0, name
        assert "fresh process" in r["memory"]["method"], name  # CPU default: one process per pass
    assert report["passes"]["forward"]["ratio_to_forward"]["median"] == 1.0
    # the attribution passes share the same batches: 2 samples × 32 tokens
    assert {report["passes"][p]["tokens_per_repeat"] for p in ("forward", "forward_logits", "forward_backward",
                                                              "lrp", "wanda")} == {64}
    assert report["passes"]["generate_batched"]["batch_size"] == 4
    assert report["passes"]["generate_unbatched"]["batch_size"] == 1
    assert report["passes"]["perplexity_batched"]["batch_size"] == 2
    assert report["passes"]["perplexity_unbatched"]["batches"] == 2
    assert set(report["speedups"]) == {"generate", "perplexity"} and all(x > 0 for x in report["speedups"].values())
    assert report["targets"]["lrp"]["max_ratio_to_forward"] == 2.5
    assert report["targets"]["wanda"]["max_ratio_to_forward"] == 1.2

    # accumulators are O(layers × width): LRP one fp32 per up_proj neuron (plus a NaN/Inf counter),
    # Wanda one fp32 per up_proj input feature
    m = report["model"]
    assert (m["layers"], m["d_model"], m["d_ff"]) == (3, 64, 96)
    lrp, wanda = report["accumulators"]["lrp"], report["accumulators"]["wanda"]
    assert lrp["tensors"]["sums"]["bytes"] == m["layers"] * m["d_ff"] * 4
    assert lrp["bytes"] - lrp["tensors"]["sums"]["bytes"] <= 8
    assert wanda["bytes"] == wanda["tensors"]["sq_sums"]["bytes"] == m["layers"] * m["d_model"] * 4


def test_benchmark_in_one_process_and_a_subset_of_passes(tmp_path):
    out = tmp_path / "bench.json"
    proc = bench(*TINY, "--isolate", "false", "--passes", "[lrp, wanda]", "--out", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert list(report["passes"]) == ["forward", "lrp", "wanda"]  # forward is added: ratios need it
    assert all("shared timing process" in r["memory"]["method"] for r in report["passes"].values())
    assert report["speedups"] == {}


def test_benchmark_bad_input_is_one_line():
    assert "--repeats" in one_line_error(bench("--repeats", "0"))
    assert "unknown pass" in one_line_error(bench("--passes", "[backward]"))
