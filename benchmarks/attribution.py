"""Cost of each attribution and evaluation pass, on the same batches of the same model.

    python -m benchmarks.attribution                    # embedded SmolLM2-135M on the CPU
    python -m benchmarks.attribution --model random:llama3-8b --device cuda --dtype bf16 --out bench.json

Attribution passes, on the same collated batches of ``Embedded("general", "attribution")``:

- ``forward``: ``forward_backward(backward=False)``, which stops at the last hidden state (all Wanda
  needs); the reference of every ratio.
- ``forward_logits``: ``model(...).logits`` with full-vocabulary logits, as perplexity runs it.
- ``forward_backward``: ``forward_backward(backward=True)`` with no hook registered: the engine's LRP
  pass minus the callback's accumulation. lxt patches transformers' classes for the whole process,
  so the same pass without its rules cannot run beside it.
- ``lrp``: the same with ``LRPAttribution``'s hooks, called as the engine calls them.
- ``wanda``: ``forward`` with ``WandaAttribution``'s hooks.

Evaluation passes: generated tokens/s of ``continue_prompts`` (sampled, top-p 0.9) on toxic prompts,
batched and one sequence at a time; scored tokens/s of ``perplexity``, batched and one window at a time.

Timing: every pass runs in one process on the same model. Each runs its first batch ``warmup`` times,
then the passes take turns, ``repeats`` rounds of all their batches each, so that a slow spell of a
shared machine slows every pass alike. A repeat's seconds per batch is its wall time (CUDA
synchronised) over its batches, reported as min and median over repeats; ratios compare seconds per
token with ``forward``'s.

Memory: on CPU each pass also runs its first batch twice in a fresh process (forked from a server
that has only imported the libraries). Its peak is that process's RSS high-water after the first run
(``getrusage`` ``ru_maxrss``: the libraries' touched pages and the model included); the pass's own
share is the peak minus the RSS just before it. When loading the model left a higher high-water than
the batch reached, the batch's peak is hidden and ``load_dominates`` says so. What the second run adds
to the memory in use is reported per batch (``retained_mib_per_batch``: a leak shows there). RSS
includes the allocator's slack: the same CPU forward read +83 to +237 MiB in different processes, so
differences of that size between passes are noise. On CUDA
the peak is ``torch.cuda.max_memory_allocated`` over the pass's first runs, and the growth of
``memory_allocated`` over its later runs is the per-batch retention.
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from sparc_engine.errors import SparcError

ATTRIBUTION_PASSES = ("forward", "forward_logits", "forward_backward", "lrp", "wanda")
EVALUATION_PASSES = ("generate_batched", "generate_unbatched", "perplexity_batched", "perplexity_unbatched")
PASSES = ATTRIBUTION_PASSES + EVALUATION_PASSES
# most seconds per token of a pass relative to `forward` (the attribution cost a method may add)
TARGETS = {"lrp": 2.5, "wanda": 1.2}
MIB = 2**20
# memory still in use after a batch, beyond the first, that is reported as a possible leak (RSS wobbles
# by a few MiB as the allocator keeps or returns freed memory)
LEAK_MIB = 16

DESCRIPTIONS = {
    "forward": "forward_backward(backward=False): to the last hidden state, no grad",
    "forward_logits": "model(...).logits: full-vocabulary logits, no grad",
    "forward_backward": "forward_backward(backward=True), no hooks: LRP minus accumulation",
    "lrp": "LRPAttribution hooks + forward_backward(backward=True)",
    "wanda": "WandaAttribution hooks + forward_backward(backward=False)",
    "generate_batched": "continue_prompts, sampled; batch = one generate call",
    "generate_unbatched": "continue_prompts, sampled, one sequence per call",
    "perplexity_batched": "perplexity; batch = one forward of ppl_batch_size windows",
    "perplexity_unbatched": "perplexity, one window per forward",
}


@dataclass
class Settings:
    """What ``benchmark`` runs; see its docstring for each field."""

    model: str
    device: str
    dtype: str
    seq_len: int
    batch_size: int
    batches: int
    repeats: int
    warmup: int
    prompts: int
    continuations: int
    gen_batch_size: int
    unbatched_sequences: int
    max_new_tokens: int
    ppl_windows: int
    ppl_batch_size: int
    passes: tuple[str, ...]
    isolate: bool
    progress: bool

    def __post_init__(self):
        positive = ("seq_len", "batch_size", "batches", "repeats", "prompts", "continuations", "gen_batch_size",
                    "unbatched_sequences", "max_new_tokens", "ppl_windows", "ppl_batch_size")
        for name in positive:
            if getattr(self, name) < 1:
                raise SparcError(f"--{name} must be at least 1, got {getattr(self, name)}")
        if self.seq_len < 2:
            raise SparcError(f"--seq_len must be at least 2 tokens, got {self.seq_len}")
        if self.warmup < 0:
            raise SparcError(f"--warmup must be >= 0, got {self.warmup}")
        unknown = [p for p in self.passes if p not in PASSES]
        if unknown:
            raise SparcError(f"unknown pass {unknown[0]!r} in --passes", f"choose from {', '.join(PASSES)}")


def benchmark(
    model: str = "embedded",
    device: str = "cpu",
    dtype: str = "auto",
    seq_len: int = 256,
    batch_size: int = 4,
    batches: int = 2,
    repeats: int = 3,
    warmup: int = 1,
    prompts: int = 8,
    continuations: int = 4,
    gen_batch_size: int = 32,
    unbatched_sequences: int = 4,
    max_new_tokens: int = 20,
    ppl_windows: int = 8,
    ppl_batch_size: int = 8,
    passes: list[str] | None = None,
    isolate: bool | None = None,
    out: Path | None = None,
    progress: bool = True,
) -> dict:
    """Time the attribution passes (forward, forward+backward, LRP, Wanda) and the evaluation passes.

    The attribution passes share the same batches of the same model; generation and perplexity run
    batched and one at a time. Prints a table; writes JSON with ``out``.

    Args:
        model: ``embedded`` (SmolLM2-135M), a hub id, a local directory, a ``.gguf`` file or
            ``random:<shape>`` (``tiny``, ``smollm2-135m``, ``llama3-8b``: randomly initialised).
        device: ``cpu`` or ``cuda``.
        dtype: ``auto`` (bf16 on CUDA, fp32 on CPU), ``bf16``, ``fp16`` or ``fp32``.
        seq_len: tokens per attribution sample and per perplexity window (texts are cut to it).
        batch_size: samples per attribution batch.
        batches: attribution batches per repeat (the first ``batches × batch_size`` samples).
        repeats: timed repeats of every pass (min and median are reported).
        warmup: untimed runs of each pass's first batch before the repeats.
        prompts: toxic prompts (``Embedded("toxic", "validation")``) for the generation passes.
        continuations: sampled continuations per prompt (as toxicity's ``k``); ``prompts ×
            continuations`` sequences in the batched generation pass.
        gen_batch_size: sequences per ``generate`` call in the batched generation pass.
        unbatched_sequences: the first this many of those sequences, one per call, in the unbatched
            generation pass (one at a time is slow; tokens/s is what is compared).
        max_new_tokens: tokens generated per sequence (fewer where EOS comes first; only the tokens
            returned are counted).
        ppl_windows: perplexity windows (documents of ``Embedded("general", "validation")`` cut to
            ``seq_len``) per repeat.
        ppl_batch_size: windows per forward in the batched perplexity pass (the unbatched one uses 1).
        passes: which passes to run (default all); ``forward`` is always added, as every ratio needs it.
        isolate: measure each pass's memory in a fresh process that runs its first batch once, so that
            the RSS high-water is that pass's own; default true on CPU, false on CUDA (where
            ``torch.cuda.max_memory_allocated`` is per pass anyway). False on CPU reports only the
            growth of the shared process's high-water (a lower bound).
        out: write the results here as JSON (atomically).
        progress: show a line per memory process and a progress bar of the timing (on stderr).

    Returns:
        The results written to ``out``: ``settings``, ``environment``, ``model``, ``passes`` (per pass:
        seconds per batch min/median, tokens/s, seconds per 1k tokens, ratio to forward, memory),
        ``targets``, ``speedups`` and ``accumulators``.
    """
    import torch

    chosen = tuple(dict.fromkeys(["forward", *(passes or PASSES)]))
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise SparcError(f"unknown --device {device!r}", "use cpu or cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SparcError(f"--device {device} was asked but no CUDA device is visible", "use --device cpu")
    settings = Settings(model, device, dtype, seq_len, batch_size, batches, repeats, warmup, prompts, continuations,
                        gen_batch_size, unbatched_sequences, max_new_tokens, ppl_windows, ppl_batch_size, chosen,
                        not device.startswith("cuda") if isolate is None else isolate, progress)
    environment = _environment(settings)
    started = time.perf_counter()
    isolated = {}
    if settings.isolate:
        for n, name in enumerate(settings.passes, 1):
            isolated[name] = _in_fresh_process(settings, name)
            if progress:
                mem = isolated[name]["memory"]
                print(f"memory [{n}/{len(settings.passes)}] {name}: peak {mem['peak_mib']:.0f} MiB, "
                      f"+{mem['increase_mib']:.0f} MiB over the loaded model", file=sys.stderr, flush=True)
    results = time_passes(_Context(settings))
    for name, measured in isolated.items():
        results[name]["memory"] = measured["memory"]
    environment["wall_s"] = round(time.perf_counter() - started, 1)
    environment["load_average_after"] = _load_average()
    report = _summarise(settings, environment, results)
    print(format_table(report))
    if out is not None:
        from sparc_engine.atomic import write_json

        write_json(out, report)
        print(f"wrote {out}")
    return report


# ------------------------------------------------------------------------------------------ the passes

class _Context:
    """The model and the data every pass of one process shares."""

    def __init__(self, settings: Settings):
        from sparc_engine.models import load_model

        self.settings = settings
        self.loaded = load_model(settings.model, dtype=settings.dtype, device=settings.device)
        self.model, self.tokenizer = self.loaded.model, self.loaded.tokenizer
        limit = getattr(self.model.config, "max_position_embeddings", None)
        if limit and settings.seq_len > limit:
            raise SparcError(f"--seq_len {settings.seq_len} exceeds the model's context of {limit} tokens")
        self._batches = self._sequences = self._documents = None
        # weights loaded from safetensors can stay memory-mapped until first read; read them now, so
        # that the first pass's memory is its own and not the model paging in
        import torch

        with torch.no_grad():
            for p in self.model.parameters():
                p.sum()

    def batches(self):
        """The attribution batches: the first ``batches × batch_size`` general texts, as the engine collates them."""
        if self._batches is None:
            from sparc_engine.data import Embedded
            from sparc_engine.engine import Sample, collate

            s = self.settings
            ids = Embedded("general", "attribution").samples(self.tokenizer, s.seq_len)
            samples = [Sample(x, 1) for x in ids if len(x) > 1]
            needed = s.batches * s.batch_size
            if len(samples) < needed:
                raise SparcError(f"the embedded general set holds {len(samples)} samples, {needed} needed",
                                 "lower --batches or --batch_size")
            self._batches = [collate(samples, list(range(i, i + s.batch_size)), self.tokenizer.pad_token_id,
                                     self.settings.device) for i in range(0, needed, s.batch_size)]
        return self._batches

    def sequences(self) -> list[list[int]]:
        """Toxic prompts, each repeated ``continuations`` times (adjacent, as ``toxicity`` does)."""
        if self._sequences is None:
            from sparc_engine.data import Embedded

            s = self.settings
            texts = Embedded("toxic", "validation").texts()
            if len(texts) < s.prompts:
                raise SparcError(f"the embedded toxic validation set holds {len(texts)} prompts, {s.prompts} asked",
                                 "lower --prompts")
            self._sequences = [self.tokenizer(t).input_ids for t in texts[: s.prompts] for _ in range(s.continuations)]
        return self._sequences

    def documents(self) -> list[list[int]]:
        """Perplexity documents cut to ``seq_len`` tokens (one window each), longest first."""
        if self._documents is None:
            from sparc_engine.data import Embedded

            docs = [d[: self.settings.seq_len] for d in Embedded("general", "validation").documents(self.tokenizer)]
            docs = sorted((d for d in docs if len(d) > 1), key=len, reverse=True)[: self.settings.ppl_windows]
            if len(docs) < self.settings.ppl_windows:
                raise SparcError(f"the embedded general validation set holds {len(docs)} documents, "
                                 f"{self.settings.ppl_windows} asked", "lower --ppl_windows")
            self._documents = docs
        return self._documents


@dataclass
class Workload:
    """One pass: between ``start()`` and ``end()``, ``run(i)`` runs batch ``i`` of ``n`` and returns the
    tokens it processed."""

    n: int
    batch: int  # sequences per batch
    run: Callable[[int], int]
    start: Callable[[], None] = lambda: None
    end: Callable[[], None] = lambda: None
    accumulator: dict | None = None


def _workload(ctx: _Context, name: str) -> Workload:
    import torch

    model, s = ctx.model, ctx.settings
    if name in ATTRIBUTION_PASSES:
        from callbacks.lrp import LRPAttribution
        from callbacks.wanda import WandaAttribution
        from sparc_engine.engine import forward_backward

        batches = ctx.batches()
        tokens = [int(b.attention_mask.sum()) for b in batches]
        callback = {"lrp": LRPAttribution, "wanda": WandaAttribution}.get(name)
        callback = callback() if callback else None
        backward = name in ("forward_backward", "lrp")
        work = Workload(len(batches), s.batch_size, run=lambda i: 0)

        def run(i: int) -> int:
            batch = batches[i]
            if name == "forward_logits":
                with torch.no_grad():
                    model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
                return tokens[i]
            if callback is not None:
                callback.on_batch_start(batch)
            forward_backward(model, batch, backward)
            if callback is not None:
                callback.on_batch_end(batch)
            return tokens[i]

        work.run = run
        if callback is not None:
            # hooks only while this pass runs: the passes take turns on one model
            def start() -> None:
                callback.on_attribution_start(model)
                work.accumulator = accumulator_size(callback)

            work.start, work.end = start, lambda: callback.on_attribution_end(model)
        return work

    if name.startswith("generate"):
        from sparc_engine.generation import continue_prompts

        batched = name == "generate_batched"
        size = s.gen_batch_size if batched else 1
        sequences = ctx.sequences() if batched else ctx.sequences()[: s.unbatched_sequences]
        chunks = [sequences[i:i + size] for i in range(0, len(sequences), size)]

        def run(i: int) -> int:
            out = continue_prompts(model, ctx.tokenizer, chunks[i], max_new_tokens=s.max_new_tokens, do_sample=True,
                                   top_p=0.9, seed=i, batch_size=size)
            return sum(len(c) for c in out)

        return Workload(len(chunks), size, run)

    from sparc_engine.evaluation import perplexity

    size = s.ppl_batch_size if name == "perplexity_batched" else 1
    documents = ctx.documents()
    chunks = [documents[i:i + size] for i in range(0, len(documents), size)]

    def run(i: int) -> int:
        return perplexity(model, chunks[i], s.seq_len, batch_size=size, progress=False)["tokens"]

    return Workload(len(chunks), size, run)


def accumulator_size(callback) -> dict:
    """Bytes of a callback's accumulators (its ``state_dict`` tensors): what it holds across batches."""
    tensors = {k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch."),
                   "bytes": v.numel() * v.element_size()}
               for k, v in callback.state_dict().items()}
    return {"tensors": tensors, "bytes": sum(t["bytes"] for t in tensors.values())}


def _is_cuda(ctx: _Context) -> bool:
    import torch

    return torch.device(ctx.settings.device).type == "cuda"


def time_passes(ctx: _Context) -> dict[str, dict]:
    """Warm every pass up, then time ``repeats`` rounds in which the passes take turns."""
    import torch
    from tqdm.auto import tqdm

    s = ctx.settings
    cuda = _is_cuda(ctx)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    works = {name: _workload(ctx, name) for name in s.passes}
    memory = {name: _Memory(cuda, fresh_process=False) for name in s.passes}
    repeats: dict[str, list[dict]] = {name: [] for name in s.passes}
    bar = tqdm(total=sum(s.warmup + s.repeats * w.n for w in works.values()), unit="batch", leave=False,
               disable=not s.progress, dynamic_ncols=True)
    try:
        for name, work in works.items():
            bar.set_description(f"warm-up {name}")
            if not s.warmup:
                continue
            work.start()
            try:
                memory[name].begin()  # the first runs are where a shared process's high-water grows
                for _ in range(s.warmup):
                    work.run(0)
                    sync()
                    bar.update(1)
                memory[name].end(batches=s.warmup)
            finally:
                work.end()
        for r in range(s.repeats):
            for name, work in works.items():
                bar.set_description(f"repeat {r + 1}/{s.repeats} {name}")
                work.start()
                try:
                    memory[name].begin()
                    sync()
                    t0 = time.perf_counter()
                    tokens = 0
                    for i in range(work.n):
                        tokens += work.run(i)
                        bar.update(1)
                    sync()
                    repeats[name].append({"seconds": time.perf_counter() - t0, "tokens": tokens})
                    memory[name].end(batches=work.n)
                finally:
                    work.end()
    finally:
        bar.close()
    model = _model_info(ctx)
    return {name: _timing(name, work, repeats[name], memory[name].result(), model) for name, work in works.items()}


def _timing(name: str, work: Workload, repeats: list[dict], memory: dict, model: dict) -> dict:
    per_batch = [r["seconds"] / work.n for r in repeats]
    rates = [r["tokens"] / r["seconds"] for r in repeats]
    per_1k = [1000 * r["seconds"] / r["tokens"] for r in repeats]
    result = {
        "description": DESCRIPTIONS[name],
        "kind": "attribution" if name in ATTRIBUTION_PASSES else "evaluation",
        "batches": work.n, "batch_size": work.batch,
        "tokens_per_repeat": statistics.median(r["tokens"] for r in repeats),
        "seconds_per_batch": {"min": min(per_batch), "median": statistics.median(per_batch)},
        "tokens_per_s": {"max": max(rates), "median": statistics.median(rates)},
        "seconds_per_1k_tokens": {"min": min(per_1k), "median": statistics.median(per_1k)},
        "repeats": repeats,
        "memory": memory,
        "model": model,
    }
    if work.accumulator is not None:
        result["accumulator"] = work.accumulator
    return result


def first_batch_memory(ctx: _Context, name: str) -> dict:
    """Peak memory of one run of the pass's first batch (every batch has the same shape, the first the
    longest), and the memory a second run leaves behind (a leak shows there)."""
    work = _workload(ctx, name)
    work.start()
    try:
        memory = _Memory(_is_cuda(ctx), fresh_process=True)
        for _ in range(2):
            memory.begin()
            work.run(0)
            memory.end(batches=1)
    finally:
        work.end()
    return {"memory": memory.result(), "accumulator": work.accumulator}


class _Memory:
    """Memory of one pass over its blocks of runs, each between ``begin()`` and ``end()``: the peak of
    the first block, and how much more stays in use after each later batch (what a leak adds)."""

    def __init__(self, cuda: bool, fresh_process: bool):
        self.cuda, self.fresh = cuda, fresh_process
        self.before = self.high_water_before = self.peak = None
        self.after: list[int] = []  # in use after each block
        self.batches: list[int] = []  # batches run in each block

    def _in_use(self) -> int:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.memory_allocated()
        return _current_rss()

    def begin(self) -> None:
        import torch

        if self.before is not None:
            return
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            self.high_water_before = _rss_high_water()
        self.before = self._in_use()

    def end(self, batches: int) -> None:
        import torch

        if self.peak is None:
            self.peak = torch.cuda.max_memory_allocated() if self.cuda else _rss_high_water()
        self.after.append(self._in_use())
        self.batches.append(batches)

    def result(self) -> dict:
        retained = None
        if len(self.after) > 1 and sum(self.batches[1:]):
            retained = (self.after[-1] - self.after[0]) / sum(self.batches[1:]) / MIB
        if self.cuda:
            method = "torch.cuda.max_memory_allocated over the pass's first runs"
            increase = self.peak - self.before
        elif self.fresh:
            method = ("getrusage ru_maxrss of a fresh process that loaded the model and ran only this pass's "
                      "first batch")
            increase = max(0, self.peak - self.before)
        else:
            method = "getrusage ru_maxrss growth during this pass in the shared timing process (a lower bound)"
            increase = max(0, self.peak - self.high_water_before)
        result = {"method": method, "peak_mib": self.peak / MIB, "before_mib": self.before / MIB,
                  "increase_mib": increase / MIB, "retained_mib_per_batch": retained}
        if not self.cuda:
            result["load_dominates"] = self.peak <= self.high_water_before
        return result


def _rss_high_water() -> int:
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def _current_rss() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return _rss_high_water()


def _model_info(ctx: _Context) -> dict:
    from sparc_engine.models import mlp_layers, model_shape

    model = ctx.model
    layers, d_ff = model_shape(model)
    return {"name": ctx.settings.model, "class": type(model).__name__, "layers": layers,
            "d_model": mlp_layers(model)[0].up_proj.in_features, "d_ff": d_ff,
            "parameters": sum(p.numel() for p in model.parameters()),
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch."), "device": ctx.settings.device}


# ------------------------------------------------------------------------------------- fresh processes

def _quiet() -> None:
    import logging
    import warnings

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
    except ImportError:
        pass


def _worker(conn, settings: Settings, name: str) -> None:
    try:
        _quiet()
        conn.send(("ok", first_batch_memory(_Context(settings), name)))
    except SparcError as e:
        conn.send(("error", str(e)))
    except BaseException as e:  # noqa: BLE001 - reported by the parent with the traceback's last lines
        conn.send(("error", f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=6)}"))
    finally:
        conn.close()


# imported once by the fork server, so that each pass's process starts in a fraction of a second;
# importing starts no thread, so forking after it is safe
_PRELOAD = ["torch", "transformers.models.llama.modeling_llama", "lxt.efficient", "sparc_engine.engine",
            "sparc_engine.evaluation", "callbacks.lrp", "callbacks.wanda", "tqdm.auto"]


def _process_context():
    """Fresh processes forked from a server that has only imported the libraries (spawned where fork is missing)."""
    import multiprocessing as mp

    if "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)
    return ctx


def _in_fresh_process(settings: Settings, name: str) -> dict:
    """Run one pass in a fresh process, so that the RSS high-water is that pass's own."""
    ctx = _process_context()
    parent, child = ctx.Pipe(duplex=False)
    process = ctx.Process(target=_worker, args=(child, settings, name), name=f"bench-{name}")
    process.start()
    child.close()
    try:
        status, payload = parent.recv()
    except EOFError:
        process.join()
        raise SparcError(f"the {name} pass died (exit code {process.exitcode}) before reporting",
                         "lower --batch_size or --seq_len if it ran out of memory") from None
    process.join()
    if status != "ok":
        if "\n" in payload:  # an unexpected exception: show its traceback
            print(payload, file=sys.stderr)
        raise SparcError(f"the {name} pass failed: {payload.splitlines()[0]}",
                         "see the traceback above, or rerun with --isolate false")
    return payload


# ---------------------------------------------------------------------------------------------- report

def _load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _environment(settings: Settings) -> dict:
    import torch

    env = {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
           "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
           "load_average_before": _load_average()}
    if settings.device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name(torch.device(settings.device))
    return env


def _summarise(settings: Settings, environment: dict, results: dict) -> dict:
    forward = results["forward"]["seconds_per_1k_tokens"]
    for r in results.values():
        per_1k = r["seconds_per_1k_tokens"]
        r["ratio_to_forward"] = {k: per_1k[k] / forward[k] for k in ("min", "median")}
    targets = {}
    for name, limit in TARGETS.items():
        if name in results:
            ratio = results[name]["ratio_to_forward"]
            targets[name] = {"max_ratio_to_forward": limit, "ratio": ratio["median"], "ratio_min": ratio["min"],
                             "met": ratio["median"] <= limit}
    speedups = {}
    for kind in ("generate", "perplexity"):
        if f"{kind}_batched" in results and f"{kind}_unbatched" in results:
            speedups[kind] = (results[f"{kind}_batched"]["tokens_per_s"]["median"]
                              / results[f"{kind}_unbatched"]["tokens_per_s"]["median"])
    model = next(iter(results.values()))["model"]
    for r in results.values():
        r.pop("model", None)
    accumulators = {name: results[name].pop("accumulator") for name in ("lrp", "wanda")
                    if name in results and "accumulator" in results[name]}
    return {"settings": asdict(settings) | {"passes": list(settings.passes)}, "environment": environment,
            "model": model, "tokens_per_batch": settings.batch_size * settings.seq_len,
            "passes": results, "targets": targets, "speedups": speedups, "accumulators": accumulators}


def _mib(x: float | None) -> str:
    return "-" if x is None else f"{x:.0f}"


def _bytes(n: int) -> str:
    return f"{n / 1024:.1f} KiB" if n < MIB else f"{n / MIB:.1f} MiB"


def format_table(report: dict) -> str:
    """The human-readable summary of a report."""
    s, m, env = report["settings"], report["model"], report["environment"]
    lines = [f"{m['name']} ({m['class']}: {m['layers']} layers, d_model {m['d_model']}, d_ff {m['d_ff']}, "
             f"{m['parameters'] / 1e6:.0f}M parameters) on {m['device']} {m['dtype']}, {env['torch_threads']} threads; "
             f"{s['batches']} batches of {s['batch_size']} × {s['seq_len']} tokens, {s['repeats']} repeats after "
             f"{s['warmup']} warm-up; load average {env['load_average_before']} → {env['load_average_after']}",
             "",
             f"{'pass':<22}{'s/batch min':>12}{'median':>9}{'tokens/s':>10}{'× forward':>11}{'(min)':>7}"
             f"{'s/1k tok':>10}{'peak MiB':>10}{'+MiB':>8}{'kept/batch':>11}  batches"]
    for name, r in report["passes"].items():
        mem = r["memory"]
        lines.append(f"{name:<22}{r['seconds_per_batch']['min']:>12.3f}{r['seconds_per_batch']['median']:>9.3f}"
                     f"{r['tokens_per_s']['median']:>10.0f}{r['ratio_to_forward']['median']:>11.2f}"
                     f"{r['ratio_to_forward']['min']:>7.2f}{r['seconds_per_1k_tokens']['median']:>10.3f}"
                     f"{mem['peak_mib']:>10.0f}{mem['increase_mib']:>8.0f}{'*' if mem.get('load_dominates') else ' '}"
                     f"{_mib(mem['retained_mib_per_batch']):>10} {r['batches']}×{r['batch_size']}")
    lines.append("")
    for name, r in report["passes"].items():
        kept = r["memory"]["retained_mib_per_batch"]
        if kept is not None and kept > max(LEAK_MIB, 0.05 * r["memory"]["increase_mib"]):
            lines.append(f"LEAK? {name} keeps {kept:.0f} MiB more in use after every further batch")
    for name, t in report["targets"].items():
        lines.append(f"target {name}: {t['ratio']:.2f}× forward (min-based {t['ratio_min']:.2f}×), "
                     f"target ≤ {t['max_ratio_to_forward']}× — {'met' if t['met'] else 'NOT met'}")
    for kind, x in report["speedups"].items():
        b = report["passes"][f"{kind}_batched"]["batch_size"]
        lines.append(f"speed-up {kind}: batch {b} vs 1 = {x:.2f}× tokens/s")
    for name, acc in report["accumulators"].items():
        parts = ", ".join(f"{k} {'×'.join(map(str, t['shape'])) or 'scalar'} {t['dtype']} = {_bytes(t['bytes'])}"
                          for k, t in acc["tensors"].items())
        lines.append(f"accumulators {name}: {parts} (total {acc['bytes']} bytes)")
    first = next(iter(report["passes"].values()))["memory"]
    lines.append(f"memory: {first['method']}; +MiB = peak − memory in use just before; kept/batch = growth of the memory in use per "
                 "further batch (MiB)"
                 + ("; * = the load's high-water hid the pass's peak" if any(
                     r["memory"].get("load_dominates") for r in report["passes"].values()) else ""))
    lines.append(f"wall time {env['wall_s']} s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``python -m benchmarks.attribution [options]``; errors caused by input print one line, exit code 2."""
    _quiet()
    from sparc_engine.cli import run_cli

    return run_cli(benchmark, argv)


if __name__ == "__main__":
    sys.exit(main())
