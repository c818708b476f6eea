import gzip
import json

import pytest

from sparc_engine.data import C4, Embedded, LocalFile, RealToxicityPrompts, WikiText2, read_texts
from sparc_engine.errors import SparcError
from tests.conftest import one_line_error, sparc


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_embedded_sets_have_the_promised_sizes(tiny):
    general = Embedded("general", "all").texts()
    assert len(general) >= 64
    assert min(len(ids) for ids in tiny.tokenizer(general).input_ids) >= 150
    toxic = Embedded("toxic", "all").texts()
    assert len(toxic) >= 100 and len(Embedded("neutral", "all").texts()) >= 30
    assert Embedded("toxic").kind == "prompts" and Embedded("general").kind == "text"


@pytest.mark.parametrize("name", ["general", "toxic"])
def test_embedded_splits_are_disjoint(name):
    splits = {s: set(Embedded(name, s).texts()) for s in ("attribution", "validation", "test")}
    assert all(splits.values())
    assert not splits["attribution"] & splits["test"]
    assert not splits["attribution"] & splits["validation"]
    assert not splits["validation"] & splits["test"]
    assert set().union(*splits.values()) == set(Embedded(name, "all").texts())


def test_local_files(tmp_path):
    jsonl = write_jsonl(tmp_path / "a.jsonl", [{"text": "one"}, {"text": "two"}])
    assert read_texts(jsonl) == ["one", "two"]
    (tmp_path / "b.txt").write_text("first para\nstill first\n\nsecond\n")
    assert read_texts(tmp_path / "b.txt") == ["first para\nstill first", "second"]
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"prompt": ["p1", "p2", ""]}), tmp_path / "c.parquet")
    source = LocalFile(str(tmp_path / "c.parquet"), field="prompt")
    assert source.texts() == ["p1", "p2"] and source.kind == "prompts"


@pytest.mark.parametrize("content, message", [
    ('{"text": "ok"}\n{"text": broken\n', "a.jsonl:2 is not valid JSON"),
    ('{"text": "ok"}\n{"body": "x"}\n', "a.jsonl:2 has no field 'text'"),
    ('{"text": ""}\n\n', "no usable text"),
])
def test_bad_local_files(tmp_path, content, message):
    (tmp_path / "a.jsonl").write_text(content)
    with pytest.raises(SparcError, match=message):
        read_texts(tmp_path / "a.jsonl")


def test_bad_data_file_through_cli(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "ok"}\n{"text": broken\n')
    proc = sparc("attribute", "--model", "random:tiny", "--data.class_path", "sparc_engine.data.LocalFile",
                 "--data.init_args.path", tmp_path / "a.jsonl", "--out_dir", tmp_path / "out")
    assert "a.jsonl:2 is not valid JSON" in one_line_error(proc)
    missing = sparc("attribute", "--model", "random:tiny", "--data.class_path", "sparc_engine.data.LocalFile",
                    "--data.init_args.path", tmp_path / "missing.jsonl", "--out_dir", tmp_path / "out")
    assert "does not exist" in one_line_error(missing)
    assert not list((tmp_path / "out").glob("*.safetensors")) if (tmp_path / "out").exists() else True


@pytest.fixture
def c4_file(tmp_path):
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()
    rows = [{"text": " ".join(words[(i + j) % 10] + str(i) for j in range(40 + i % 7)), "url": f"u{i}"}
            for i in range(300)]
    path = tmp_path / "c4-train.00000-of-01024.json.gz"
    with gzip.open(path, "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return str(path)


def test_c4_seeded_shuffle(c4_file, tiny):
    a = C4(seed=0, n_samples=8, path=c4_file, buffer_size=100).samples(tiny.tokenizer, 32)
    b = C4(seed=0, n_samples=8, path=c4_file, buffer_size=100).samples(tiny.tokenizer, 32)
    c = C4(seed=1, n_samples=8, path=c4_file, buffer_size=100).samples(tiny.tokenizer, 32)
    assert a == b
    assert a != c
    assert all(len(s) == 32 for s in a + c)
    with pytest.raises(SparcError, match="documents longer than"):
        C4(seed=0, n_samples=8, path=c4_file).samples(tiny.tokenizer, 10_000)


def test_real_toxicity_prompts_filter(tmp_path):
    rows = [{"filename": f"f{i}", "challenging": i % 2 == 0,
             "prompt": {"text": f"prompt {i}", "toxicity": i / 100},
             "continuation": {"text": f"cont {i}", "toxicity": (99 - i) / 100}} for i in range(100)]
    rows.append({"prompt": {"text": "no score", "toxicity": None}, "continuation": {"text": "x", "toxicity": None},
                 "filename": "n", "challenging": False})
    path = str(write_jsonl(tmp_path / "rtp.jsonl", rows))
    attribution = RealToxicityPrompts(threshold=0.8, count=10, path=path).texts()
    held_out = RealToxicityPrompts(threshold=0.8, count=10, offset=10, path=path).texts()
    assert all(int(p.split()[1]) >= 80 for p in attribution + held_out)
    assert not set(attribution) & set(held_out)
    by_continuation = RealToxicityPrompts(threshold=0.95, field="continuation", count=5, path=path).texts()
    assert all(int(p.split()[1]) <= 4 for p in by_continuation)
    with pytest.raises(SparcError, match="only"):
        RealToxicityPrompts(threshold=0.8, count=30, path=path).texts()


def test_wikitext2_local_stream(tmp_path, tiny):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = ["", " = Heading = \n", "", " Some text about things . \n"] * 20
    pq.write_table(pa.table({"text": rows}), tmp_path / "test.parquet")
    source = WikiText2(path=str(tmp_path / "test.parquet"))
    assert len(source.texts()) == 1 and "\n\n" in source.texts()[0]
    windows = source.samples(tiny.tokenizer, 16)
    assert windows and all(len(w) == 16 for w in windows)
