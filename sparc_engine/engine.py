"""The attribution loop under Lightning Fabric.

Parameters are frozen, so ranks hold replicas and need no DDP wrapper (DESIGN.md §7): each rank
attributes its shard of the reference set, callbacks accumulate fp32 sums, and only the
accumulators are all-reduced. Every ``checkpoint_every`` batches (and on SIGTERM) each rank writes
its partial sums and position atomically; a rerun with the same arguments continues from there.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import math
import os
import signal
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
from tqdm.auto import tqdm

from callbacks.base import AttributionCallback, Batch
from sparc_engine import __version__
from sparc_engine.atomic import atomic_path
from sparc_engine.data import TextSource
from sparc_engine.errors import SparcError
from sparc_engine.generation import continue_prompts
from sparc_engine.models import LoadedModel, fingerprint, load_model
from sparc_engine.scores import NeuronScores

log = logging.getLogger(__name__)


@dataclass
class FabricArgs:
    """Where and how attribution runs."""

    accelerator: str = "auto"
    """``cpu``, ``cuda``/``gpu`` or ``auto``."""
    devices: int | str = "auto"
    """Processes (GPUs) per node; ``auto``: every visible GPU, or one CPU process."""
    num_nodes: int = 1
    """Nodes; under SLURM Fabric reads ranks from the environment."""
    strategy: Literal["auto", "ddp", "fsdp"] = "auto"
    """``ddp``: a replica per rank (parameters are frozen, so only accumulators are reduced);
    ``fsdp``: shard the model when one GPU cannot hold it."""
    precision: str | None = None
    """Fabric precision; default ``bf16-true`` on GPU, ``32-true`` on CPU."""

    def resolved_precision(self) -> str:
        if self.precision:
            return self.precision
        return "bf16-true" if _wants_gpu(self.accelerator) else "32-true"


def _wants_gpu(accelerator: str) -> bool:
    if accelerator in ("cuda", "gpu"):
        return True
    return accelerator == "auto" and torch.cuda.is_available()


def make_fabric(args: FabricArgs, callbacks=(), loggers=()):
    from lightning.fabric import Fabric

    if args.accelerator in ("cuda", "gpu") and not torch.cuda.is_available():
        raise SparcError(f"accelerator={args.accelerator} was asked but no CUDA device is visible",
                         "use accelerator=cpu or run on a GPU node")
    if args.strategy == "fsdp":
        # Sharding needs the forward to go through the FSDP root, which the target-logit shortcut in
        # forward_backward bypasses; refuse rather than silently hold a full replica per rank.
        raise SparcError("strategy fsdp is not supported yet: every rank would still hold the whole model",
                         "use strategy auto/ddp (replicas), a shorter seq_len or a larger GPU (docs/memory.md)")
    from lightning.fabric.connector import _is_using_cli

    precision = args.resolved_precision()
    if _is_using_cli() and args.precision is None and os.environ.get("LT_PRECISION"):
        precision = None  # the launcher's --precision wins
    try:
        return Fabric(accelerator=args.accelerator, devices=args.devices, num_nodes=args.num_nodes,
                      strategy=args.strategy, precision=precision, callbacks=list(callbacks), loggers=list(loggers))
    except (ValueError, RuntimeError) as e:
        raise SparcError(f"invalid Fabric settings: {' '.join(str(e).split())}",
                         "make the fabric options agree with the launcher's (fabric run / srun)") from None


def load_on_rank(fabric, name: str) -> LoadedModel:
    """The model in the dtype of Fabric's precision (``bf16-true`` → bf16, ``16-true`` → fp16), on this rank's device."""
    precision = str(fabric._connector._precision_input)
    dtype = {"bf16-true": "bf16", "16-true": "fp16"}.get(precision, "fp32")
    return load_model(name, dtype=dtype, device=str(fabric.device))


def launch(fabric, fn, *args):
    """Start the processes when this process started alone; ``fabric run`` and ``srun`` start them
    themselves and Fabric refuses a second launch."""
    from lightning.fabric.connector import _is_using_cli

    if _is_using_cli():
        return fn(fabric, *args)
    return fabric.launch(fn, *args)


@dataclass
class Sample:
    ids: list[int]
    first_target: int  # index of the first token whose logit is explained (1 for text)


@dataclass
class Continuations:
    """What is explained for prompt sets: the model's own continuations of each prompt."""

    samples: int = 1
    """Continuations per prompt: 1 is the greedy one; more are sampled (top-p, seeded)."""
    top_p: float = 0.9
    """Nucleus threshold of sampled continuations."""
    seed: int = 0
    """Sampling seed (every rank draws the same continuations)."""
    keep_threshold: float | None = None
    """Explain only continuations the scorer rates at least this toxic (None: all): the neurons that
    drive toxic output, not those that continue a toxic prompt harmlessly."""


def prepare_samples(fabric, loaded: LoadedModel, source: TextSource, seq_len: int, max_new_tokens: int,
                    batch_size: int, continuations: Continuations = Continuations(),
                    scorer=None) -> tuple[list[Sample], list[str] | None]:
    """Token samples and, for prompts, the model's own continuations (the explained tokens)."""
    tokenized = source.samples(loaded.tokenizer, seq_len)
    if not tokenized:
        raise SparcError(f"reference set {source.name} is empty", "give a data source with at least one text")
    if source.kind == "text":
        return [Sample(ids, 1) for ids in tokenized if len(ids) > 1], None
    c = continuations
    if c.samples < 1:
        raise SparcError(f"continuations.samples must be at least 1, got {c.samples}")
    # every rank generates all continuations with the same seed: identical on every rank, nothing to gather
    prompts = [p for p in tokenized for _ in range(c.samples)]
    conts = continue_prompts(loaded.model, loaded.tokenizer, prompts, max_new_tokens, do_sample=c.samples > 1,
                             top_p=c.top_p, seed=c.seed, batch_size=max(batch_size, 16))
    pairs = [(p, x[: seq_len - len(p)]) for p, x in zip(prompts, conts) if x]
    if c.keep_threshold is not None:
        if scorer is None:
            raise SparcError("continuations.keep_threshold needs a toxicity scorer", "set `scorer`")
        texts = [loaded.tokenizer.decode(x, skip_special_tokens=True) for _, x in pairs]
        pairs = [pair for pair, score in zip(pairs, scorer.score(texts)) if score >= c.keep_threshold]
        log.info("%s: %d of %d continuations rated >= %.2f are explained", source.name, len(pairs), len(prompts),
                 c.keep_threshold)
    if not pairs:
        raise SparcError(f"no continuation of {source.name} is left to explain",
                         "check max_new_tokens, or lower continuations.keep_threshold / raise continuations.samples")
    return [Sample(p + x, len(p)) for p, x in pairs], [loaded.tokenizer.decode(x) for _, x in pairs]


def shard_batches(n: int, rank: int, world: int, batch_size: int) -> list[list[int]]:
    """This rank's sample indices in batches; every rank gets the same number of batches, and
    positions past the end hold -1 (padding samples of weight 0, so FSDP ranks stay in step)."""
    per_rank = math.ceil(n / world)
    mine = [rank + world * k for k in range(per_rank)]
    mine = [i if i < n else -1 for i in mine]
    return [mine[i:i + batch_size] for i in range(0, per_rank, batch_size)]


def collate(samples: list[Sample], indices: list[int], pad_id: int, device) -> Batch:
    rows = [samples[i] if i >= 0 else samples[0] for i in indices]
    width = max(len(s.ids) for s in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(rows), width), dtype=torch.long)
    target = torch.zeros((len(rows), width), dtype=torch.bool)
    for r, s in enumerate(rows):
        ids[r, : len(s.ids)] = torch.tensor(s.ids)
        attn[r, : len(s.ids)] = 1
        target[r, s.first_target: len(s.ids)] = True
    weight = torch.tensor([1.0 if i >= 0 else 0.0 for i in indices])
    return Batch(ids.to(device), attn.to(device), target.to(device), weight.to(device))


def forward_backward(model, batch: Batch, backward: bool, target: str = "logit") -> None:
    """One pass. With ``backward``, the explained outputs (for the true or generated next tokens) seed
    the backward pass: ``logit`` seeds each target logit with its own value (lxt's convention:
    relevance at the output = logit); ``logprob`` seeds log p(target) with 1, so relevance also
    counts what a neuron does to the competing tokens (the loss, not only the logit)."""
    with torch.set_grad_enabled(backward):
        embeds = model.get_input_embeddings()(batch.input_ids)
        if backward:
            embeds.requires_grad_(True)
        hidden = model.model(inputs_embeds=embeds, attention_mask=batch.attention_mask).last_hidden_state
        if not backward:
            return
        where = batch.target_mask[:, 1:] & (batch.sample_weight[:, None] > 0)
        h, y = hidden[:, :-1][where], batch.input_ids[:, 1:][where]
        weight = model.get_output_embeddings().weight
        if target == "logit":
            # only the explained logits: h_t · W[y_{t+1}], no full-vocabulary logits
            logits = (h * weight[y]).sum(-1)
            logits.backward(logits.detach())
        else:
            logp = torch.log_softmax((h @ weight.T).float(), dim=-1).gather(1, y[:, None])
            logp.backward(torch.ones_like(logp))


def _hook_caller(fabric, callbacks: list[AttributionCallback]):
    """Call a hook on this pass's attribution callbacks and on Fabric's other callbacks (monitors),
    never on attribution callbacks of another pass. Like ``fabric.call``, each hook receives only
    the keyword arguments it declares."""
    targets = list(callbacks) + [c for c in fabric._callbacks if not isinstance(c, AttributionCallback)]

    def call(hook: str, **kwargs) -> None:
        for cb in targets:
            method = getattr(cb, hook, None)
            if callable(method):
                params = inspect.signature(method).parameters
                method(**{k: v for k, v in kwargs.items() if k in params})

    return call


def group_by_target(callbacks: list[AttributionCallback]) -> list[list[AttributionCallback]]:
    """Callbacks that can share one pass: those with a backward pass need the same target;
    forward-only ones join the first group."""
    groups: dict[str, list] = {}
    for cb in callbacks:
        if cb.needs_backward:
            groups.setdefault(getattr(cb, "target", "logit"), []).append(cb)
    forward_only = [cb for cb in callbacks if not cb.needs_backward]
    ordered = list(groups.values()) or [[]]
    ordered[0] = ordered[0] + forward_only
    return ordered


class _Interrupt:
    """Turns SIGTERM (SLURM's warning signal) into a checkpoint and a clean exit."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread
            self._previous = None
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def run_key(loaded: LoadedModel, source: TextSource, callbacks, seq_len: int, batch_size: int, world: int,
            continuations: Continuations) -> str:
    parts = [fingerprint(loaded.model), source.name, seq_len, batch_size, world, str(continuations),
             [(c.method, getattr(c, "target", None)) for c in callbacks]]
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:16]


def attribute_set(fabric, loaded: LoadedModel, source: TextSource, callbacks: list[AttributionCallback], *,
                  seq_len: int, batch_size: int, max_new_tokens: int = 20,
                  continuations: Continuations = Continuations(), scorer=None, checkpoint_dir: Path | None = None,
                  checkpoint_every: int = 50, tag: str = "attribution") -> dict[str, NeuronScores]:
    """Attribute one reference set with every callback; returns the reduced scores on every rank.

    Callbacks that need different backward targets run in separate passes over the same samples
    (prepared once), each with its own checkpoint."""
    samples, explained = prepare_samples(fabric, loaded, source, seq_len, max_new_tokens, batch_size, continuations,
                                         scorer)
    groups = group_by_target(callbacks)
    results = {}
    for group in groups:
        name = tag if len(groups) == 1 else f"{tag}-" + "-".join(c.method for c in group)
        results |= _attribute_pass(fabric, loaded, source, group, samples, explained, seq_len=seq_len,
                                   batch_size=batch_size, max_new_tokens=max_new_tokens, continuations=continuations,
                                   checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every, tag=name)
    return results


def _attribute_pass(fabric, loaded: LoadedModel, source: TextSource, callbacks: list[AttributionCallback],
                    samples: list[Sample], explained: list[str] | None, *, seq_len: int, batch_size: int,
                    max_new_tokens: int, continuations: Continuations, checkpoint_dir: Path | None,
                    checkpoint_every: int, tag: str) -> dict[str, NeuronScores]:
    """One forward (and backward) sweep over the samples for callbacks that share a target."""
    model = loaded.model
    batches = shard_batches(len(samples), fabric.global_rank, fabric.world_size, batch_size)
    key = run_key(loaded, source, callbacks, seq_len, batch_size, fabric.world_size, continuations)
    ckpt = checkpoint_dir / f"{tag}.rank{fabric.global_rank}.pt" if checkpoint_dir else None
    backward = any(c.needs_backward for c in callbacks)
    target = next((getattr(c, "target", "logit") for c in callbacks if c.needs_backward), "logit")
    pad_id = loaded.tokenizer.pad_token_id

    call = _hook_caller(fabric, callbacks)
    call("on_attribution_start", model=model)
    start, counts = 0, torch.zeros(2, dtype=torch.float64, device=fabric.device)  # samples, tokens
    if ckpt is not None and ckpt.is_file():
        state = torch.load(ckpt, map_location=fabric.device, weights_only=True)
        if state["key"] == key:
            for cb, cb_state in zip(callbacks, state["callbacks"]):
                cb.load_state_dict(cb_state)
            start, counts = state["next_batch"], state["counts"].to(fabric.device)
            log.info("rank %d resumes %s at batch %d/%d from %s", fabric.global_rank, tag, start, len(batches), ckpt)

    def save_checkpoint(next_batch: int) -> None:
        state = {"key": key, "next_batch": next_batch, "counts": counts.cpu(),
                 "callbacks": [{k: v.cpu() for k, v in cb.state_dict().items()} for cb in callbacks]}
        with atomic_path(ckpt) as tmp:
            torch.save(state, tmp)

    bar = tqdm(total=len(batches), initial=start, desc=f"{tag} [{source.name}]", unit="batch",
               disable=fabric.global_rank != 0, dynamic_ncols=True)
    with _Interrupt() as interrupt:
        for i in range(start, len(batches)):
            batch = collate(samples, batches[i], pad_id, fabric.device)
            call("on_batch_start", batch=batch)
            with fabric.autocast():
                forward_backward(model, batch, backward, target)
            call("on_batch_end", fabric=fabric, batch=batch)
            counts += torch.stack([batch.sample_weight.sum(),
                                   (batch.attention_mask * batch.sample_weight[:, None]).sum()]).double()
            bar.update(1)
            bar.set_postfix(tokens=int(counts[1]))
            last = i + 1 == len(batches)
            if ckpt is not None and not last and ((i + 1) % checkpoint_every == 0 or interrupt.requested):
                save_checkpoint(i + 1)
            if interrupt.requested and not last:
                bar.close()
                raise SparcError(f"interrupted by SIGTERM at batch {i + 1}/{len(batches)}"
                                 + (f"; checkpoint written to {ckpt}" if ckpt else ""),
                                 "run the same command again to resume")
    bar.close()
    call("on_attribution_end", model=model)

    for cb in callbacks:
        cb.reduce(fabric)
    counts = fabric.all_reduce(counts, reduce_op="sum")
    samples_n, tokens_n = int(counts[0]), int(counts[1])
    meta = {"model": loaded.name, "model_fingerprint": fingerprint(model), "data": source.name,
            "kind": source.kind, "target": target, "seq_len": seq_len, "batch_size": batch_size,
            "world_size": fabric.world_size, "precision": type(fabric.strategy.precision).__name__,
            "dtype": str(next(model.parameters()).dtype), "version": __version__}
    if explained is not None:
        meta["continuations"] = explained
        meta["explain"] = asdict(continuations) | {"max_new_tokens": max_new_tokens}
    results = {cb.method: cb.scores(model, samples_n, tokens_n, dict(meta, method=cb.method)) for cb in callbacks}
    for method, s in results.items():
        if s.nonfinite:
            log.warning("%s on %s: %d NaN/Inf neuron contributions were counted and left out of the sums",
                        method, source.name, s.nonfinite)
    fabric.barrier()
    if ckpt is not None:
        ckpt.unlink(missing_ok=True)
    return results
