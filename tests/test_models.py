import subprocess
import sys

import pytest
import torch

from sparc_engine.errors import SparcError
from sparc_engine.models import check_llama, embedded_gguf_path, fingerprint, load_model, model_shape
from tests.conftest import one_line_error, sparc


def test_embedded_model_is_smollm2(embedded):
    assert type(embedded.model).__name__ == "LlamaForCausalLM"
    assert model_shape(embedded.model) == (30, 1536)
    ids = embedded.tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = embedded.model(ids).logits
    assert torch.isfinite(logits).all()
    # a real trained model: " Paris" is among its top guesses
    top = [embedded.tokenizer.decode(t).strip() for t in logits[0, -1].topk(5).indices]
    assert "Paris" in top, top


def test_gguf_file_loads_directly(embedded):
    direct = load_model(str(embedded_gguf_path()))
    assert fingerprint(direct.model) == fingerprint(embedded.model)


def test_random_tiny_llama(tiny):
    assert model_shape(tiny.model) == (3, 96)
    assert not any(p.requires_grad for p in tiny.model.parameters())


UNPATCHED = """
import sys, torch
from sparc_engine.models import load_model
m = load_model("random:tiny", lrp=False).model
ids = torch.arange(3, 40)[None]
torch.save(m(ids).logits, sys.argv[1])
"""


def test_lrp_patch_keeps_forward(tiny, tmp_path):
    # lxt patches classes for the whole process, so the unpatched reference runs in a fresh one
    subprocess.run([sys.executable, "-c", UNPATCHED, str(tmp_path / "ref.pt")], check=True)
    reference = torch.load(tmp_path / "ref.pt")
    from transformers.models.llama.modeling_llama import LlamaMLP

    assert LlamaMLP.forward.__module__ == "lxt.efficient.patches"
    with torch.no_grad():
        patched = tiny.model(torch.arange(3, 40)[None]).logits
    torch.testing.assert_close(patched, reference, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    from transformers import GPT2Config, GPT2LMHeadModel

    path = tmp_path_factory.mktemp("gpt2")
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100)).save_pretrained(path)
    from sparc_engine.models import embedded_model_dir

    from transformers import AutoTokenizer
    AutoTokenizer.from_pretrained(embedded_model_dir()).save_pretrained(path)
    return path


def test_non_llama_model_is_refused(gpt2_dir):
    with pytest.raises(SparcError, match="not Llama-shaped"):
        load_model(str(gpt2_dir))
    line = one_line_error(sparc("attribute", "--model", gpt2_dir, "--out_dir", gpt2_dir / "out"))
    assert "not Llama-shaped" in line
    assert not (gpt2_dir / "out").exists() or not list((gpt2_dir / "out").glob("*.safetensors"))


def test_check_llama_rejects_plain_module():
    with pytest.raises(SparcError):
        check_llama(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("name, message", [
    ("/no/such/dir", "does not exist"),
    ("missing.gguf", "does not exist"),
    ("random:nope", "unknown random model shape"),
    ("no-such-org/no-such-model-offline", "cannot load model"),
])
def test_bad_model_names(name, message, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SparcError, match=message):
        load_model(name)


def test_unknown_model_offline_cli(tmp_path):
    line = one_line_error(sparc("attribute", "--model", "no-such-org/no-such-model", "--out_dir", tmp_path,
                                env={"HF_HUB_OFFLINE": "1"}))
    assert "cannot load model" in line
