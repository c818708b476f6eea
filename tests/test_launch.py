"""Launch scripts (launch/) and the Llama-3-8B configs.

The SLURM scripts are checked by what they would run (DRY_RUN=1 prints the sbatch, srun and sparc
command lines) and by their SIGTERM/requeue path with stand-ins for srun, scancel and scontrol;
`fabric run` is run for real with two CPU processes.
"""

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import ROOT, one_line_error, sparc

LAUNCH = ROOT / "launch"
SUBMIT = LAUNCH / "slurm" / "submit.sh"
RUN_CONFIG = ROOT / "configs" / "llama3-8b-toxicity.yaml"
HARDWARE = [ROOT / "configs" / "llama3-8b-h200.yaml", ROOT / "configs" / "llama3-8b-a100-40gb.yaml"]
SLURM_VARS = ("PARTITION", "GPUS", "GPU_TYPE", "NODES", "TIME", "MEM", "CPUS_PER_TASK", "ACCOUNT", "QOS",
              "JOB_NAME", "LOG_DIR", "SIGNAL_SECONDS", "SBATCH_EXTRA", "MODEL", "HW_CONFIG", "OUT_DIR", "SEEDS",
              "K", "METHODS", "EVAL_PROMPTS", "EVAL_BATCH_SIZE", "DETOXIFY_CHECKPOINT", "DETOXIFY_HF_CONFIG",
              "C4_PATH", "RTP_PATH", "WIKITEXT_PATH", "ACCELERATOR", "DEVICES", "NUM_NODES", "NODE_RANK",
              "MAIN_ADDRESS", "MAIN_PORT", "PRECISION", "STRATEGY", "SPARC_ROOT", "DRY_RUN")


def clean_env(**extra) -> dict:
    """This environment without SLURM/Fabric settings (a test run inside a job must not look like one)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "LT_")) and k not in SLURM_VARS}
    env["SPARC"] = "sparc"  # printed command lines name the console script, wherever it is installed
    return env | {k: str(v) for k, v in extra.items()}


def dry_run(script: Path, *args, **variables) -> list[list[str]]:
    proc = subprocess.run(["bash", str(script), *map(str, args)], capture_output=True, text=True, cwd=ROOT,
                          env=clean_env(DRY_RUN=1, **variables), timeout=60)
    assert proc.returncode == 0, proc.stderr
    return [shlex.split(line) for line in proc.stdout.splitlines() if line.strip()]


def options(tokens: list[str]) -> dict[str, str | None]:
    """``--name=value`` / bare ``--flag`` options of an sbatch or srun line, up to the first non-option."""
    out = {}
    for tok in tokens:
        if not tok.startswith("--"):
            break
        name, _, value = tok.partition("=")
        out[name] = value if "=" in tok else None
    return out


def sparc_part(tokens: list[str]) -> list[str]:
    """The sparc command (subcommand onwards) of an srun or plain line."""
    return tokens[tokens.index("sparc") + 1:]


def flag(args: list[str], name: str) -> str:
    """The value after the last ``name`` (later options win, as in jsonargparse)."""
    positions = [i for i, a in enumerate(args) if a == name]
    assert positions, f"{name} missing from {args}"
    return args[positions[-1] + 1]


# ------------------------------------------------------------------------------------------- syntax

@pytest.mark.parametrize("script", sorted(p for p in LAUNCH.rglob("*") if p.suffix in (".sh", ".sbatch")),
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_scripts_parse(script):
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_scripts_are_executable():
    for script in [LAUNCH / "fabric_run.sh", SUBMIT, *(LAUNCH / "slurm").glob("*.sbatch")]:
        assert os.access(script, os.X_OK), script


# ------------------------------------------------------------------------------------------ SLURM

def test_submit_attribute_renders_resources_and_srun():
    lines = dry_run(SUBMIT, "attribute", "--config", "configs/llama3-8b-h200.yaml", "--out_dir", "out/x",
                    PARTITION="h200", GPUS=4, NODES=2, TIME="04:00:00", MEM="256G", ACCOUNT="proj")
    assert len(lines) == 2, lines
    sbatch, srun = lines
    assert sbatch[0] == "sbatch"
    assert options(sbatch[1:]) == {
        "--job-name": "sparc-attribute", "--partition": "h200", "--nodes": "2", "--ntasks-per-node": "4",
        "--gres": "gpu:4", "--cpus-per-task": "8", "--mem": "256G", "--time": "04:00:00",
        "--signal": "B:TERM@120", "--requeue": None, "--open-mode": "append", "--output": "logs/%x-%j.out",
        "--chdir": str(ROOT), "--export": "ALL", "--account": "proj"}
    script = next(t for t in sbatch[1:] if not t.startswith("--"))
    assert script == str(LAUNCH / "slurm" / "attribute.sbatch")
    assert sbatch[sbatch.index(script) + 1:] == ["--config", "configs/llama3-8b-h200.yaml", "--out_dir", "out/x"]

    assert srun[0] == "srun"
    assert options(srun[1:]) == {"--nodes": "2", "--ntasks-per-node": "4", "--kill-on-bad-exit": "1"}
    assert sparc_part(srun) == ["attribute", "--config", "configs/llama3-8b-h200.yaml", "--out_dir", "out/x",
                                "--fabric.devices", "4", "--fabric.num_nodes", "2"]


def test_submit_defaults_and_gpu_type():
    (sbatch, srun), = [dry_run(SUBMIT, "attribute")]
    opts = options(sbatch[1:])
    assert (opts["--partition"], opts["--gres"], opts["--nodes"], opts["--ntasks-per-node"], opts["--mem"],
            opts["--time"]) == ("gpu", "gpu:1", "1", "1", "32G", "24:00:00")
    assert "--account" not in opts and "--qos" not in opts
    assert sparc_part(srun)[-4:] == ["--fabric.devices", "1", "--fabric.num_nodes", "1"]

    sbatch = dry_run(SUBMIT, "attribute", GPUS=8, GPU_TYPE="a100", QOS="long", SIGNAL_SECONDS=300)[0]
    opts = options(sbatch[1:])
    assert (opts["--gres"], opts["--mem"], opts["--qos"], opts["--signal"]) == ("gpu:a100:8", "256G", "long",
                                                                                "B:TERM@300")


def test_submit_refuses_unknown_job():
    proc = subprocess.run(["bash", str(SUBMIT), "train"], capture_output=True, text=True, env=clean_env(DRY_RUN=1))
    assert proc.returncode == 2 and proc.stderr.startswith("error: usage")


def test_experiment_follows_the_run_config(tmp_path):
    """The seed-averaged pipeline uses the settings of configs/llama3-8b-toxicity.yaml, and every
    command it prints parses."""
    cfg = yaml.safe_load(RUN_CONFIG.read_text())
    out = tmp_path / "exp"
    lines = dry_run(SUBMIT, "experiment", PARTITION="h200", GPUS=4, NODES=2, TIME="04:00:00", OUT_DIR=out)
    sbatch, steps = lines[0], lines[1:]
    assert options(sbatch[1:])["--gres"] == "gpu:4"
    assert next(t for t in sbatch[1:] if not t.startswith("--")) == str(LAUNCH / "slurm" / "experiment.sbatch")

    attribute = [s for s in steps if s[0] == "srun"]
    prune = [sparc_part(s) for s in steps if sparc_part(s)[0] == "prune"]
    evaluate = [sparc_part(s) for s in steps if sparc_part(s)[0] == "evaluate"]
    assert len(steps) == len(attribute) + len(prune) + len(evaluate)
    assert len(attribute) == 4 and len(prune) == 4 and len(evaluate) == 5  # 2 methods × {project, paper} + baseline

    general, toxic = [sparc_part(s) for s in attribute[:3]], sparc_part(attribute[3])
    for s in attribute:
        assert options(s[1:]) == {"--nodes": "2", "--ntasks-per-node": "4", "--kill-on-bad-exit": "1"}
    for seed, args in enumerate(general):
        assert args[0] == "attribute"
        assert args[-4:] == ["--fabric.devices", "4", "--fabric.num_nodes", "2"]
        assert flag(args, "--model") == cfg["model"]
        assert int(flag(args, "--seq_len")) == cfg["seq_len"]
        assert flag(args, "--fabric.precision") == cfg["fabric"]["precision"]
        assert flag(args, "--data.class_path") == cfg["general"]["class_path"]
        assert int(flag(args, "--data.init_args.seed")) == seed
        assert int(flag(args, "--data.init_args.n_samples")) == cfg["general"]["init_args"]["n_samples"]
        assert flag(args, "--out_dir") == f"{out}/general-seed{seed}"
        # the hardware overlay comes after the experiment settings, so that it wins
        assert args.index("--config") > args.index("--seq_len")
    assert flag(toxic, "--data.class_path") == cfg["toxic"]["class_path"]
    for key, value in cfg["toxic"]["init_args"].items():
        assert flag(toxic, f"--data.init_args.{key}") == str(value)
    assert int(flag(toxic, "--max_new_tokens")) == cfg["max_new_tokens"]

    for args in prune:
        method = Path(flag(args, "--out")).name.split(".")[1]
        assert flag(args, "--general") == "[" + ",".join(
            f"{out}/general-seed{s}/scores.{method}.safetensors" for s in range(3)) + "]"
        assert flag(args, "--toxic") == f"[{out}/toxic/scores.{method}.safetensors]"
        assert int(flag(args, "--k")) == cfg["k"]
    paper = [a for a in prune if a[a.index("--out") + 1].endswith(".paper.json")]
    assert len(paper) == 2 and all(flag(a, "--selection.normalize") == "none" for a in paper)

    held_out = cfg["eval_prompts"]["init_args"]
    for args in evaluate:
        assert flag(args, "--model") == cfg["model"]
        assert flag(args, "--perplexity_data.class_path") == cfg["perplexity_data"]["class_path"]
        assert flag(args, "--prompts.class_path") == cfg["eval_prompts"]["class_path"]
        for key, value in held_out.items():
            assert flag(args, f"--prompts.init_args.{key}") == str(value)
        assert int(flag(args, "--prompts.init_args.offset")) == cfg["toxic"]["init_args"]["count"]
        assert flag(args, "--scorer.class_path") == cfg["scorer"]["class_path"]
        for key in ("seq_len", "k", "max_new_tokens", "top_p", "seed", "batch_size"):
            assert flag(args, f"--settings.{key}") == str(cfg["evaluation"][key])
    assert [flag(a, "--neurons") for a in evaluate[1:]] == [flag(a, "--out") for a in prune]

    for args in (general[0], toxic, paper[0], evaluate[-1]):
        proc = sparc(*args, "--print_config")
        assert proc.returncode == 0, (args, proc.stderr[-2000:])


@pytest.mark.parametrize("overlay,batch_size", [(HARDWARE[0], 4), (HARDWARE[1], 1)], ids=lambda x: getattr(x, "stem", x))
def test_experiment_overlay_keeps_paper_samples(tmp_path, overlay, batch_size):
    """With SDPA attention both overlays attribute the paper's 2048-token samples; they set only the batch size."""
    lines = dry_run(LAUNCH / "slurm" / "experiment.sbatch", HW_CONFIG=overlay.relative_to(ROOT),
                    OUT_DIR=tmp_path, METHODS="lrp", SEEDS="0")
    proc = sparc(*sparc_part(lines[0]), "--print_config")
    assert proc.returncode == 0, proc.stderr[-2000:]
    printed = yaml.safe_load(proc.stdout)
    assert printed["seq_len"] == 2048 and printed["batch_size"] == batch_size
    assert printed["fabric"]["strategy"] == "auto"


def test_experiment_skips_finished_steps(tmp_path):
    for seed in (0, 1, 2):
        (tmp_path / f"general-seed{seed}").mkdir()
        (tmp_path / f"general-seed{seed}" / "scores.lrp.safetensors").touch()
    lines = dry_run(LAUNCH / "slurm" / "experiment.sbatch", OUT_DIR=tmp_path)
    assert [sparc_part(s)[0] for s in lines[:2]] == ["attribute", "prune"]
    assert flag(sparc_part(lines[0]), "--out_dir") == f"{tmp_path}/toxic"


FAKE_SPARC = """#!/bin/bash
echo "$@" > "$FAKE_DIR/args"
trap 'touch "$FAKE_DIR/checkpointed"; exit 2' TERM
echo $$ > "$FAKE_DIR/pid"
while :; do sleep 0.05; done
"""
FAKE_SRUN = """#!/bin/bash
while [[ $1 == --* ]]; do shift; done
exec "$@"
"""
FAKE_SCANCEL = """#!/bin/bash
echo "$@" >> "$FAKE_DIR/scancel"
kill -TERM "$(cat "$FAKE_DIR/pid")"
"""
FAKE_SCONTROL = """#!/bin/bash
echo "$@" >> "$FAKE_DIR/scontrol"
"""


def test_time_limit_warning_checkpoints_and_requeues(tmp_path):
    """SIGTERM to the batch shell reaches the sparc ranks (through scancel) and requeues the job."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in [("sparc", FAKE_SPARC), ("srun", FAKE_SRUN), ("scancel", FAKE_SCANCEL),
                       ("scontrol", FAKE_SCONTROL)]:
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = clean_env(FAKE_DIR=tmp_path, PATH=f"{bin_dir}:{os.environ['PATH']}", SPARC_ROOT=ROOT,
                    SLURM_JOB_ID=4242, SLURM_JOB_NUM_NODES=1, SLURM_NTASKS_PER_NODE=2)
    job = subprocess.Popen(["bash", str(LAUNCH / "slurm" / "attribute.sbatch"), "--out_dir", "out/x"], env=env,
                           cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 20
        while not (tmp_path / "pid").exists():
            assert job.poll() is None and time.time() < deadline, job.communicate()
            time.sleep(0.05)
        job.send_signal(signal.SIGTERM)
        stdout, stderr = job.communicate(timeout=20)
    finally:
        job.kill()
    assert job.returncode == 0, stderr
    assert (tmp_path / "args").read_text().split() == ["attribute", "--out_dir", "out/x",
                                                       "--fabric.devices", "2", "--fabric.num_nodes", "1"]
    assert (tmp_path / "checkpointed").exists()
    assert (tmp_path / "scancel").read_text().split() == ["--signal=TERM", "4242"]
    assert (tmp_path / "scontrol").read_text().split() == ["requeue", "4242"]


# ------------------------------------------------------------------------------------- fabric run

def test_fabric_run_dry_run_passes_settings_to_both_sides():
    (line,) = dry_run(LAUNCH / "fabric_run.sh", "attribute", "--config", "c.yaml", ACCELERATOR="cpu", DEVICES=2,
                      PRECISION="32-true", STRATEGY="ddp", MAIN_PORT=29511)
    assert line[1] == "run"
    entry = line.index(str(LAUNCH / "sparc_entry.py"))
    assert line[2:entry] == ["--accelerator", "cpu", "--devices", "2", "--num_nodes", "1", "--node_rank", "0",
                             "--main_address", "127.0.0.1", "--main_port", "29511"]
    assert line[entry + 1:] == ["attribute", "--config", "c.yaml", "--fabric.devices", "2", "--fabric.num_nodes",
                                "1", "--fabric.accelerator", "cpu", "--fabric.precision", "32-true",
                                "--fabric.strategy", "ddp"]


def test_fsdp_is_refused_with_one_line(tmp_path):
    """fsdp is not supported yet (the target-logit shortcut bypasses the FSDP root): a one-line error, exit 2."""
    out = tmp_path / "x"
    proc = sparc("attribute", "--model", "random:tiny", "--fabric.accelerator", "cpu", "--fabric.strategy", "fsdp",
                 "--out_dir", out, timeout=300)
    assert "fsdp" in one_line_error(proc)
    assert not out.exists()


def test_no_config_or_script_recommends_fsdp():
    """The Llama-3 configs and the launch scripts mention fsdp only next to "not supported"."""
    for path in [*(ROOT / "configs").glob("llama3-8b-*.yaml"), *(p for p in LAUNCH.rglob("*") if p.is_file())]:
        text = path.read_text()
        assert not re.search(r"^\s*strategy:\s*fsdp", text, re.M), path
        prose = " ".join(line.strip().lstrip("#").strip() for line in text.splitlines()).lower()
        for m in re.finditer("fsdp", prose):
            assert "not supported" in prose[max(0, m.start() - 120): m.end() + 120], (path, prose[m.start() - 120:])


def test_fabric_run_refuses_single_process_commands():
    proc = subprocess.run(["bash", str(LAUNCH / "fabric_run.sh"), "prune"], capture_output=True, text=True,
                          env=clean_env())
    assert proc.returncode == 2 and "sparc prune" in proc.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_fabric_run_two_cpu_processes_match_one(tmp_path):
    from sparc_engine.scores import NeuronScores

    args = ["attribute", "--model", "random:tiny", "--data.init_args.limit", "5", "--seq_len", "32",
            "--batch_size", "2", "--tensorboard", "false"]
    env = clean_env(ACCELERATOR="cpu", DEVICES=2, MAIN_PORT=_free_port(),
                    PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    env.pop("SPARC")
    two = subprocess.Popen(["bash", str(LAUNCH / "fabric_run.sh"), *args, "--out_dir", str(tmp_path / "two")],
                           cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    one = sparc(*args, "--fabric.accelerator", "cpu", "--fabric.devices", "1", "--out_dir", tmp_path / "one",
                timeout=300)
    two_log = two.communicate(timeout=300)[0]
    assert one.returncode == 0, one.stderr[-3000:]
    assert two.returncode == 0, two_log[-3000:]
    for method in ("lrp", "wanda"):
        a = NeuronScores.load(tmp_path / "one" / f"scores.{method}.safetensors")
        b = NeuronScores.load(tmp_path / "two" / f"scores.{method}.safetensors")
        assert (a.meta["world_size"], b.meta["world_size"]) == (1, 2)
        assert (b.samples, b.tokens) == (a.samples, a.tokens) == (5, a.tokens)
        torch.testing.assert_close(b.values, a.values, rtol=1e-5, atol=1e-6 * float(a.values.abs().max()))


# ---------------------------------------------------------------------------------------- configs

@pytest.mark.parametrize("command,files", [
    ("run", [RUN_CONFIG]),
    ("run", [RUN_CONFIG, HARDWARE[0]]),
    ("run", [RUN_CONFIG, HARDWARE[1]]),
    ("attribute", [HARDWARE[0]]),
    ("attribute", [HARDWARE[1]]),
], ids=lambda x: x if isinstance(x, str) else "+".join(p.stem for p in x))
def test_configs_parse(command, files):
    proc = sparc(command, *[a for f in files for a in ("--config", f)], "--print_config")
    assert proc.returncode == 0, proc.stderr[-2000:]
    printed = yaml.safe_load(proc.stdout)
    assert printed["fabric"]["precision"] == "bf16-true"
    if command == "run":
        assert printed["model"] == "meta-llama/Meta-Llama-3-8B"
        assert printed["seq_len"] == 2048
        assert printed["batch_size"] == (4 if HARDWARE[0] in files else 1)
    assert printed["fabric"]["strategy"] != "fsdp"


def test_every_llama3_config_is_tested():
    assert set((ROOT / "configs").glob("llama3-8b-*.yaml")) == {RUN_CONFIG, *HARDWARE}
