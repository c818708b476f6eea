"""Reference and evaluation texts, and their tokenisation.

A source is a small class chosen in YAML the LightningCLI way (``class_path`` + ``init_args``):

    general:
      class_path: sparc_engine.data.C4
      init_args: {seed: 0, n_samples: 128}

Each source yields raw texts (``texts()``) and token samples (``samples(tokenizer, seq_len)``).
``kind`` says what attribution explains: ``text`` (the true next tokens) or ``prompts`` (the model's
own continuation). Hub sources keep their real ``datasets`` code; ``path`` points them at a local
file of the same shape.
"""

from __future__ import annotations

import json
import random
from functools import cached_property
from importlib import resources
from pathlib import Path
from typing import Literal

from sparc_engine.errors import SparcError

Split = Literal["attribution", "validation", "test", "all"]


class TextSource:
    """Base class of reference and evaluation sources."""

    kind: Literal["text", "prompts"] = "text"

    @property
    def name(self) -> str:
        return type(self).__name__

    def texts(self) -> list[str]:
        raise NotImplementedError

    def samples(self, tokenizer, seq_len: int) -> list[list[int]]:
        """One token sequence per text: texts are cut to ``seq_len``; prompts must fit in it."""
        out = []
        for text in self.texts():
            ids = tokenizer(text).input_ids
            if self.kind == "text":
                ids = ids[:seq_len]
            elif len(ids) >= seq_len:
                raise SparcError(f"a prompt of {self.name} has {len(ids)} tokens, seq_len is {seq_len}",
                                 "raise seq_len or shorten the prompt")
            out.append(ids)
        return out

    def documents(self, tokenizer) -> list[list[int]]:
        """Whole token sequences, uncut, for perplexity windows."""
        return [tokenizer(t).input_ids for t in self.texts()]


def _nonempty(texts: list[str], origin: str, field: str) -> list[str]:
    texts = [t for t in texts if isinstance(t, str) and t.strip()]
    if not texts:
        raise SparcError(f"{origin} has no usable text in field {field!r}",
                         "check the file and the `field` option")
    return texts


def read_texts(path: str | Path, field: str = "text") -> list[str]:
    """Texts from a local ``.jsonl`` (one object per line), ``.json``, ``.txt`` (paragraphs) or ``.parquet``."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise SparcError(f"data file {path} does not exist", "check the path")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        rows = []
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise SparcError(f"{path}:{lineno} is not valid JSON ({e.msg})",
                                     "fix that line; the file must hold one JSON object per line") from None
                if not isinstance(row, dict) or field not in row:
                    raise SparcError(f"{path}:{lineno} has no field {field!r}",
                                     "set `field` to the name of the text field")
                rows.append(_text_of(row[field]))
        return _nonempty(rows, str(path), field)
    if suffix == ".txt":
        paragraphs = [p.strip() for p in path.read_text(encoding="utf-8").split("\n\n")]
        return _nonempty(paragraphs, str(path), "paragraphs")
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as e:  # pyarrow raises several types for corrupt files
            raise SparcError(f"{path} is not a readable parquet file ({type(e).__name__})", "check the file") from None
        if field not in table.column_names:
            raise SparcError(f"{path} has no column {field!r} (columns: {', '.join(table.column_names)})",
                             "set `field` to the name of the text column")
        return _nonempty([_text_of(v) for v in table.column(field).to_pylist()], str(path), field)
    raise SparcError(f"unsupported data file type {path.suffix!r} ({path})", "use .jsonl, .json, .txt or .parquet")


def _text_of(value) -> str:
    # RealToxicityPrompts nests the text: {"prompt": {"text": ..., "toxicity": ...}}
    return value.get("text", "") if isinstance(value, dict) else value


class LocalFile(TextSource):
    def __init__(self, path: str, field: str = "text", kind: Literal["auto", "text", "prompts"] = "auto",
                 limit: int | None = None):
        """Texts from a local file.

        Args:
            path: a ``.jsonl``/``.json`` (one object per line), ``.txt`` (blank-line separated) or ``.parquet`` file.
            field: the field (column) holding the text.
            kind: ``text`` explains true next tokens, ``prompts`` explains the model's continuation;
                ``auto`` means ``prompts`` when the field is called ``prompt``.
            limit: keep at most this many texts (in file order).
        """
        self.path, self.field, self.limit = path, field, limit
        self.kind = ("prompts" if field == "prompt" else "text") if kind == "auto" else kind

    @property
    def name(self) -> str:
        return f"file:{self.path}"

    def texts(self) -> list[str]:
        return read_texts(self.path, self.field)[: self.limit]


class Embedded(TextSource):
    def __init__(self, set: Literal["general", "toxic", "neutral"] = "general", split: Split = "attribution",
                 limit: int | None = None):
        """Sample texts shipped with sparc_engine (``sparc_engine/samples/``), written by this project.

        Args:
            set: ``general`` (everyday passages), ``toxic`` (openings that invite an insulting
                continuation) or ``neutral`` (harmless openings).
            split: ``attribution``, ``validation`` (choose defaults here), ``test`` (held out) or ``all``.
            limit: keep at most this many.
        """
        self.set, self.split, self.limit = set, split, limit
        self.kind = "text" if set == "general" else "prompts"

    @property
    def name(self) -> str:
        return f"embedded:{self.set}/{self.split}"

    @cached_property
    def _rows(self) -> list[dict]:
        file = {"general": "general.jsonl", "toxic": "toxic_prompts.jsonl", "neutral": "neutral_prompts.jsonl"}[self.set]
        text = resources.files("sparc_engine").joinpath("samples", file).read_text(encoding="utf-8")
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def texts(self) -> list[str]:
        field = "text" if self.set == "general" else "prompt"
        rows = [r for r in self._rows if self.split == "all" or r.get("split", self.split) == self.split]
        return _nonempty([r[field] for r in rows], self.name, field)[: self.limit]


class C4(TextSource):
    def __init__(self, seed: int = 0, n_samples: int = 128, path: str | None = None,
                 hub_id: str = "allenai/c4", data_file: str = "en/c4-train.00000-of-01024.json.gz",
                 buffer_size: int = 10000):
        """C4 documents, streamed and shuffled with a seed; one random ``seq_len`` window per document.

        As in Wanda/SparseGPT: only documents longer than ``seq_len`` tokens are used.

        Args:
            seed: seed of ``shuffle(seed, buffer_size)`` and of the window positions.
            n_samples: number of windows.
            path: a local json/jsonl(.gz) file of C4 rows (``{"text": ...}``) instead of the hub.
            hub_id: dataset id on the hub.
            data_file: the shard streamed from the hub.
            buffer_size: shuffle buffer of the streamed dataset.
        """
        self.seed, self.n_samples, self.path = seed, n_samples, path
        self.hub_id, self.data_file, self.buffer_size = hub_id, data_file, buffer_size

    @property
    def name(self) -> str:
        return f"c4(seed={self.seed},n={self.n_samples})" + (f":{self.path}" if self.path else "")

    def _stream(self):
        from datasets import load_dataset

        if self.path:
            if not Path(self.path).is_file():
                raise SparcError(f"data file {self.path} does not exist", "check the C4 `path`")
            ds = load_dataset("json", data_files=self.path, split="train", streaming=True)
        else:
            ds = _hub(lambda: load_dataset(self.hub_id, data_files={"train": self.data_file}, split="train",
                                           streaming=True), self.hub_id)
        return ds.shuffle(seed=self.seed, buffer_size=self.buffer_size)

    def texts(self) -> list[str]:
        return [row["text"] for _, row in zip(range(self.n_samples), self._stream())]

    def samples(self, tokenizer, seq_len: int) -> list[list[int]]:
        rng = random.Random(self.seed)
        out = []
        for row in self._stream():
            ids = tokenizer(row["text"]).input_ids
            if len(ids) <= seq_len:
                continue
            start = rng.randint(0, len(ids) - seq_len - 1)
            out.append(ids[start:start + seq_len])
            if len(out) == self.n_samples:
                return out
        raise SparcError(f"{self.name} holds only {len(out)} documents longer than {seq_len} tokens, "
                         f"{self.n_samples} asked", "lower n_samples or seq_len")


class RealToxicityPrompts(TextSource):
    kind = "prompts"

    def __init__(self, threshold: float = 0.9, field: Literal["prompt", "continuation"] = "prompt",
                 count: int = 93, offset: int = 0, seed: int = 0, path: str | None = None,
                 hub_id: str = "allenai/real-toxicity-prompts"):
        """RealToxicityPrompts prompts whose ``prompt`` or ``continuation`` toxicity is >= ``threshold``.

        The filtered prompts are shuffled with ``seed``; this source takes ``count`` of them starting
        at ``offset``, so attribution (offset 0) and held-out evaluation (offset = attribution count)
        never share a prompt.

        Args:
            threshold: minimum Perspective toxicity score.
            field: which score the threshold applies to.
            count: number of prompts.
            offset: position of the first prompt in the shuffled, filtered list.
            seed: shuffle seed.
            path: a local jsonl/parquet file with RealToxicityPrompts rows instead of the hub.
            hub_id: dataset id on the hub.
        """
        self.threshold, self.field, self.count, self.offset = threshold, field, count, offset
        self.seed, self.path, self.hub_id = seed, path, hub_id

    @property
    def name(self) -> str:
        return f"rtp({self.field}>={self.threshold},{self.offset}:{self.offset + self.count})"

    def texts(self) -> list[str]:
        from datasets import load_dataset

        if self.path:
            if not Path(self.path).is_file():
                raise SparcError(f"data file {self.path} does not exist", "check the RealToxicityPrompts `path`")
            fmt = "parquet" if self.path.endswith(".parquet") else "json"
            ds = load_dataset(fmt, data_files=self.path, split="train")
        else:
            ds = _hub(lambda: load_dataset(self.hub_id, split="train"), self.hub_id)
        score = lambda row: (row[self.field] or {}).get("toxicity")  # noqa: E731
        ds = ds.filter(lambda row: score(row) is not None and score(row) >= self.threshold)
        ds = ds.shuffle(seed=self.seed)
        selected = ds.select(range(min(len(ds), self.offset), min(len(ds), self.offset + self.count)))
        prompts = _nonempty([row["prompt"]["text"] for row in selected], self.name, "prompt.text")
        if len(prompts) < self.count:
            raise SparcError(f"{self.name}: only {len(prompts)} prompts pass the filter at this offset",
                             "lower the threshold, count or offset")
        return prompts


class WikiText2(TextSource):
    def __init__(self, path: str | None = None, split: Literal["train", "validation", "test"] = "test",
                 hub_id: str = "wikitext", config: str = "wikitext-2-raw-v1"):
        """WikiText-2 raw, joined into one stream (the usual perplexity protocol: "\\n\\n".join).

        Args:
            path: a local parquet/jsonl file with a ``text`` column instead of the hub.
            split: which split.
            hub_id: dataset id on the hub.
            config: dataset configuration.
        """
        self.path, self.split, self.hub_id, self.config = path, split, hub_id, config

    @property
    def name(self) -> str:
        return f"wikitext2/{self.split}" + (f":{self.path}" if self.path else "")

    def texts(self) -> list[str]:
        from datasets import load_dataset

        if self.path:
            if not Path(self.path).is_file():
                raise SparcError(f"data file {self.path} does not exist", "check the WikiText-2 `path`")
            fmt = {".parquet": "parquet", ".txt": "text"}.get(Path(self.path).suffix, "json")
            ds = load_dataset(fmt, data_files=self.path, split="train")
        else:
            ds = _hub(lambda: load_dataset(self.hub_id, self.config, split=self.split), self.hub_id)
        rows = ds["text"]
        if not any(r.strip() for r in rows):
            raise SparcError(f"{self.name} has no text", "check the file")
        return ["\n\n".join(rows)]

    def samples(self, tokenizer, seq_len: int) -> list[list[int]]:
        ids = self.documents(tokenizer)[0]
        return [ids[i:i + seq_len] for i in range(0, len(ids) - seq_len + 1, seq_len)]


def _hub(load, hub_id: str):
    try:
        return load()
    except Exception as e:  # datasets raises ConnectionError, FileNotFoundError, DatasetNotFoundError...
        raise SparcError(f"cannot load dataset {hub_id!r} from the hub ({type(e).__name__})",
                         "check the network (and HF_TOKEN), or give `path` to a local copy") from None
