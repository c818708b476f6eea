"""Bad input through the real CLI: exit code 2, one line naming the problem, no partial output."""

import json
import signal
import subprocess
import sys
import time

import pytest
import torch

from sparc_engine.scores import NeuronScores
from tests.conftest import SPARC, ROOT, one_line_error, sparc

TINY = ["--model", "random:tiny", "--fabric.accelerator", "cpu", "--seq_len", "32",
        "--data.init_args.limit", "3"]


@pytest.fixture(scope="module")
def scores(tmp_path_factory):
    """LRP and Wanda scores of general and toxic sets of the tiny model."""
    root = tmp_path_factory.mktemp("scores")
    for tag in ("general", "toxic"):
        proc = sparc("attribute", *TINY, "--data.init_args.set", tag, "--out_dir", root / tag)
        assert proc.returncode == 0, proc.stderr[-2000:]
    return root


def no_outputs(path):
    return not path.exists() or not [p for p in path.rglob("*") if p.is_file() and "tensorboard" not in p.parts]


@pytest.mark.parametrize("content, message", [
    (None, "does not exist"),
    ("model: embedded\nseq_len: [1\n", "Problems parsing config"),
    ("modle: embedded\n", "does not accept option 'modle'"),
])
def test_config_errors(tmp_path, content, message):
    config = tmp_path / "c.yaml"
    if content is not None:
        config.write_text(content)
    assert message in one_line_error(sparc("attribute", "--config", config, "--out_dir", tmp_path / "out"))
    assert no_outputs(tmp_path / "out")


def test_unknown_method(tmp_path):
    line = one_line_error(sparc("attribute", *TINY, "--callbacks+=callbacks.NoSuchMethod", "--out_dir", tmp_path))
    assert "NoSuchMethod" in line


def test_empty_data_file(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n\n")
    line = one_line_error(sparc("attribute", "--model", "random:tiny", "--data.class_path", "sparc_engine.data.LocalFile",
                                "--data.init_args.path", tmp_path / "empty.jsonl", "--out_dir", tmp_path / "out"))
    assert "no usable text" in line and no_outputs(tmp_path / "out")


def test_seq_len_beyond_context(tmp_path):
    line = one_line_error(sparc("attribute", "--model", "random:tiny", "--fabric.accelerator", "cpu",
                                "--seq_len", "100000", "--out_dir", tmp_path / "out"))
    assert "exceeds the model's context of 512" in line and no_outputs(tmp_path / "out")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_requested_without_gpu(tmp_path):
    line = one_line_error(sparc("attribute", *TINY, "--fabric.accelerator", "cuda", "--out_dir", tmp_path / "out"))
    assert "no CUDA device" in line and no_outputs(tmp_path / "out")


def test_existing_output_needs_overwrite(scores):
    before = (scores / "general" / "scores.lrp.safetensors").read_bytes()
    line = one_line_error(sparc("attribute", *TINY, "--out_dir", scores / "general"))
    assert "already exists" in line and "--overwrite" in line
    assert (scores / "general" / "scores.lrp.safetensors").read_bytes() == before


def test_prune_input_errors(scores, tmp_path):
    g, t = scores / "general" / "scores.lrp.safetensors", scores / "toxic" / "scores.lrp.safetensors"
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(g.read_bytes()[:100])
    other = tmp_path / "other.safetensors"
    NeuronScores(torch.zeros(4, 96), "lrp", samples=1).save(other)
    cases = [
        (["--general", f"[{cut}]", "--toxic", f"[{t}]"], "corrupted or truncated"),
        (["--general", f"[{tmp_path / 'missing.safetensors'}]", "--toxic", f"[{t}]"], "does not exist"),
        (["--general", f"[{other}]", "--toxic", f"[{t}]"], "different layer shapes"),
        (["--general", f"[{g}]", "--toxic", f"[{scores / 'toxic' / 'scores.wanda.safetensors'}]"], "allow_method_mismatch"),
        (["--general", f"[{g}]", "--toxic", f"[{t}]", "--k", "0"], "must be positive"),
        (["--general", f"[{g}]", "--toxic", f"[{t}]", "--k", "289"], "cannot prune 289"),
        (["--general", f"[{g}]", "--toxic", f"[{t}]", "--model", "random:smollm2-135m"], "shape"),
    ]
    for args, message in cases:
        out = tmp_path / "neurons.json"
        line = one_line_error(sparc("prune", *args, "--out", out))
        assert message in line, (args, line)
        assert not out.exists()


def test_scores_of_another_model_are_refused(scores, tmp_path):
    g, t = scores / "general" / "scores.lrp.safetensors", scores / "toxic" / "scores.lrp.safetensors"
    s = NeuronScores.load(g)
    s.meta["model_fingerprint"] = "0123456789abcdef"
    s.save(tmp_path / "foreign.safetensors")
    line = one_line_error(sparc("prune", "--general", f"[{tmp_path / 'foreign.safetensors'}]", "--toxic", f"[{t}]",
                                "--out", tmp_path / "n.json"))
    assert "different models" in line
    line = one_line_error(sparc("prune", "--general", f"[{tmp_path / 'foreign.safetensors'}]",
                                "--toxic", f"[{tmp_path / 'foreign.safetensors'}]", "--model", "random:tiny",
                                "--out", tmp_path / "n.json"))
    assert "another model" in line and not (tmp_path / "n.json").exists()


def test_same_config_gives_bitwise_same_neurons(scores, tmp_path):
    out = []
    for i in range(2):
        run_dir = tmp_path / f"r{i}"
        proc = sparc("attribute", *TINY, "--data.init_args.set", "toxic", "--out_dir", run_dir)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert torch.equal(NeuronScores.load(run_dir / "scores.lrp.safetensors").values,
                           NeuronScores.load(scores / "toxic" / "scores.lrp.safetensors").values)
        proc = sparc("prune", "--general", f"[{scores / 'general' / 'scores.lrp.safetensors'}]",
                     "--toxic", f"[{run_dir / 'scores.lrp.safetensors'}]", "--k", "20", "--out", run_dir / "n.json")
        assert proc.returncode == 0, proc.stderr[-2000:]
        out.append(json.loads((run_dir / "n.json").read_text())["neurons"])
    assert out[0] == out[1]  # layer, index and score, bit for bit


KILL_DURING_WRITE = """
import os, signal, sys
from sparc_engine.atomic import atomic_path
with atomic_path(sys.argv[1]) as tmp:
    with open(tmp, "w") as f:
        f.write("half of a new ")
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
"""


def test_kill_during_write_keeps_previous_output(tmp_path):
    target = tmp_path / "metrics.json"
    target.write_text('{"previous": true}\n')
    proc = subprocess.run([sys.executable, "-c", KILL_DURING_WRITE, str(target)], cwd=ROOT)
    assert proc.returncode == -signal.SIGKILL
    assert target.read_text() == '{"previous": true}\n'


RESUMABLE = ["attribute", "--model", "random:smollm2-135m", "--fabric.accelerator", "cpu", "--seq_len", "64",
             "--batch_size", "1", "--data.init_args.limit", "12", "--checkpoint_every", "1", "--tensorboard", "false",
             "--callbacks+=callbacks.LRPAttribution"]


def test_sigterm_checkpoints_and_rerun_resumes_to_the_same_scores(tmp_path):
    whole = sparc(*RESUMABLE, "--out_dir", tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr[-2000:]
    part = tmp_path / "part"
    proc = subprocess.Popen([*SPARC, *RESUMABLE, "--out_dir", str(part)], cwd=ROOT, stderr=subprocess.PIPE, text=True)
    ckpt = part / "checkpoints" / "attribution.rank0.pt"
    deadline = time.time() + 300
    while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 2, stderr[-2000:]
    assert "interrupted by SIGTERM" in stderr and ckpt.exists()
    assert not (part / "scores.lrp.safetensors").exists()
    resumed = sparc(*RESUMABLE, "--out_dir", part)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumes" in resumed.stderr
    a = NeuronScores.load(tmp_path / "whole" / "scores.lrp.safetensors")
    b = NeuronScores.load(part / "scores.lrp.safetensors")
    assert (a.samples, a.tokens) == (b.samples, b.tokens) == (12, a.tokens)
    torch.testing.assert_close(a.values, b.values, rtol=1e-6, atol=0)
    assert not ckpt.exists()
