"""Every data format loads; bad files name themselves; packing keeps documents apart."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import EOS, make_tokenizer

from ar2dlm.core.errors import ConfigError
from ar2dlm.nn import masks
from ar2dlm.train import data
from ar2dlm.train.config import DataSection

CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} <eos> {% endfor %}"
                 "{% if add_generation_prompt %}<assistant> {% endif %}")


@pytest.fixture
def tok():
    t = make_tokenizer()
    return t


def section(*train, **kw):
    return DataSection(train=tuple(str(t) for t in train), **{"seq_len": 16, "heldout_fraction": 0.0, **kw})


def test_text_files_folders_and_globs(tmp_path, tok):
    (tmp_path / "a.txt").write_text("w5 w6 w7")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.md").write_text("w8 w9")
    rows, _ = data.load(section(tmp_path / "a.txt"), tok)
    assert rows.tokens[0, :4].tolist() == [5, 6, 7, EOS]
    rows, _ = data.load(section(tmp_path), tok)  # a folder: every text file in it, recursively
    assert rows.tokens[0, :7].tolist() == [5, 6, 7, EOS, 8, 9, EOS]
    rows, _ = data.load(section(tmp_path / "**" / "*.md"), tok)
    assert rows.tokens[0, :3].tolist() == [8, 9, EOS]


def test_jsonl_field_parquet_and_datasets_folder(tmp_path, tok):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import Dataset

    texts = ["w5 w6", "w7 w8 w9"]
    with open(tmp_path / "d.jsonl", "w") as f:
        for t in texts:
            f.write(json.dumps({"body": t}) + "\n")
    pq.write_table(pa.table({"body": texts}), tmp_path / "d.parquet")
    Dataset.from_dict({"body": texts}).save_to_disk(str(tmp_path / "ds"))
    expected = [5, 6, EOS, 7, 8, 9, EOS]
    for path in ("d.jsonl", "d.parquet", "ds"):
        rows, _ = data.load(section(tmp_path / path, field="body"), tok)
        assert rows.tokens[0, :7].tolist() == expected, path
        assert rows.doc_ids[0, :7].tolist() == [0, 0, 0, 1, 1, 1, 1]


def test_sft_chat_masks_prompt_tokens(tmp_path, tok):
    tok.chat_template = CHAT_TEMPLATE
    tok.add_tokens(["<user>", "<assistant>", "<eos>"])
    msgs = [{"role": "user", "content": "w5 w6"}, {"role": "assistant", "content": "w7 w8"},
            {"role": "user", "content": "w9"}, {"role": "assistant", "content": "w10"}]
    (tmp_path / "chat.jsonl").write_text(json.dumps({"messages": msgs}) + "\n")
    rows, _ = data.load(section(tmp_path / "chat.jsonl", chat=True, seq_len=32), tok)
    ids, loss = rows.tokens[0].tolist(), rows.loss_mask[0].tolist()
    targets = [t for t, l in zip(ids, loss) if l]
    assert tok.decode(targets).split() == ["w7", "w8", "<eos>", "w10", "<eos>"]  # assistant turns only
    assert tok.decode([t for t, l, d in zip(ids, loss, rows.doc_ids[0].tolist()) if not l and d == 0]).split() == \
        ["<user>", "w5", "w6", "<eos>", "<assistant>", "<user>", "w9", "<eos>", "<assistant>"]


def test_distilled_records_train_on_the_continuation(tmp_path, tok):
    rec = {"id": "a", "prompt_ids": [5, 6, 7], "completion_ids": [8, 9]}
    (tmp_path / "distilled.jsonl").write_text(json.dumps(rec) + "\n")
    rows, _ = data.load(section(tmp_path / "distilled.jsonl"), tok)
    assert rows.tokens[0, :5].tolist() == [5, 6, 7, 8, 9]
    assert rows.loss_mask[0, :5].tolist() == [False, False, False, True, True]


@pytest.mark.parametrize("content, fmt, message", [
    ('{"text": "w5"}\n{"text": \n', "d.jsonl", "line 2"),
    ('{"txt": "w5"}\n', "d.jsonl", "field 'text'"),
    ('{"messages": "hi"}\n', "c.jsonl", "messages"),
    ("not parquet", "d.parquet", "not a readable Parquet"),
    ('{"prompt_ids": [1]}\n', "x.distilled.jsonl", "completion_ids"),
    ("w5", "d.bin", "cannot tell the format"),
])
def test_malformed_input_names_the_file(tmp_path, tok, content, fmt, message):
    path = tmp_path / fmt
    path.write_text(content)
    with pytest.raises(ConfigError, match=message) as err:
        data.load(section(path, chat=fmt.startswith("c.")), tok)
    assert fmt in str(err.value)


def test_missing_input_errors(tmp_path, tok):
    with pytest.raises(ConfigError, match="matches no file"):
        data.load(section(tmp_path / "nope*.txt"), tok)
    with pytest.raises(ConfigError, match="data.train is empty"):
        data.load(DataSection(), tok)


def test_packing_keeps_documents_whole_and_apart():
    docs = [data.Document([5] * 6, [True] * 6, "a"), data.Document([6] * 7, [True] * 7, "b"),
            data.Document([7] * 20, [True] * 20, "c")]
    rows = data.pack(docs, 10)
    assert rows.doc_ids.tolist()[:2] == [[0] * 6 + [-1] * 4, [1] * 7 + [-1] * 3]  # b does not fit after a
    assert rows.doc_ids[2:].flatten().tolist().count(2) == 20  # only a too-long document is split
    assert not rows.loss_mask[rows.doc_ids == -1].any()
    # and the attention mask never crosses them (clean and slot halves)
    m = masks.training_mask(10, 4, rows.doc_ids[:1])[0]
    d = torch.cat([rows.doc_ids[0], rows.doc_ids[0]])
    assert not (m & (d[:, None] != d[None, :])).any()


def test_heldout_split_is_stable_and_disjoint(tmp_path, tok):
    with open(tmp_path / "d.jsonl", "w") as f:
        for i in range(200):
            f.write(json.dumps({"text": f"w{2 + i % 90}"}) + "\n")
    a_train, a_held = data.load(section(tmp_path / "d.jsonl", heldout_fraction=0.2, seq_len=4), tok)
    b_train, b_held = data.load(section(tmp_path / "d.jsonl", heldout_fraction=0.2, seq_len=4), tok)
    assert torch.equal(a_held.tokens, b_held.tokens) and 10 < len(a_held) < 80
    assert int((a_train.doc_ids >= 0).sum() + (a_held.doc_ids >= 0).sum()) == 2 * 200  # every token, once
