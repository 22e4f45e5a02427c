"""The forward-cost table belongs to the machine: a table measured elsewhere is never applied; the model
measures its own at first use (bounded, said on stderr) and caches it per machine, dtype and thread count."""

from __future__ import annotations

import dataclasses

import torch
from conftest import make_tokenizer, tiny_model

from ar2dlm.decode import costs
from ar2dlm.model.convert import add_mask_token
from ar2dlm.model.lm import DiffusionLM
from ar2dlm.model.settings import DiffusionConfig


def _lm() -> DiffusionLM:
    model = tiny_model("llama")
    tok = make_tokenizer()
    lm = DiffusionLM(model, tok, DiffusionConfig(block_size=4, mask_token_id=add_mask_token(model, tok)))
    lm.fuse()
    return lm


def test_a_table_holds_only_for_the_machine_it_names():
    here = costs.machine_key(torch.float32)
    assert here.endswith(f"| float32 | {torch.get_num_threads()} threads")
    saved = costs.as_saved({1: 1.0, 8: 1.5}, here)
    assert costs.table_for(saved, here) == {1: 1.0, 8: 1.5}
    assert costs.table_for(saved, costs.machine_key(torch.bfloat16)) is None
    assert costs.table_for(saved, costs.machine_key(torch.float32, threads=64)) is None
    assert costs.table_for({"1": 1.0, "8": 1.9}, here) is None  # the old format named no machine
    assert costs.table_for({"machine": here, "slots": {"x": 1}}, here) is None


def test_first_use_measures_once_and_caches(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("AR2DLM_HOME", str(tmp_path))
    calls = []
    real = costs.measure
    monkeypatch.setattr(costs, "measure", lambda lm, *a, **k: calls.append(1) or real(lm, *a, **k))
    lm = _lm()
    table = lm.cost_table()
    assert calls == [1] and table[1] == 1.0 and set(table) == set(costs.SLOTS)
    assert "measuring what a drafting step costs on this machine" in capsys.readouterr().err
    assert lm.cost_table() is table and calls == [1]  # kept by the object
    again = _lm()  # a new process would find the cache file
    assert again.cost_table() == table and calls == [1]
    assert list((tmp_path / "costs").glob("*.json"))


def test_a_table_from_elsewhere_is_not_applied(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("AR2DLM_HOME", str(tmp_path))
    lm = _lm()
    elsewhere = costs.as_saved({1: 1.0, 2: 50.0, 64: 900.0}, "Another CPU | float32 | 2 threads")
    lm.settings = dataclasses.replace(lm.settings, forward_cost=elsewhere)
    table = lm.cost_table()
    assert table[2] < 50.0
    assert "was measured on Another CPU | float32 | 2 threads, not here" in capsys.readouterr().err
    here = costs.as_saved({1: 1.0, 2: 50.0, 64: 900.0}, costs.machine_key(lm.model.dtype))
    lm.settings = dataclasses.replace(lm.settings, forward_cost=here)  # tune measured it here: it is used
    assert lm.cost_table()[2] == 50.0


def test_a_damaged_cache_file_is_measured_anew(tmp_path, monkeypatch):
    monkeypatch.setenv("AR2DLM_HOME", str(tmp_path))
    lm = _lm()
    from ar2dlm.model.costs import cache_path

    path = cache_path(lm, costs.machine_key(lm.model.dtype))
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    assert lm.cost_table()[1] == 1.0
    assert costs.table_for(__import__("json").loads(path.read_text()), costs.machine_key(lm.model.dtype))
