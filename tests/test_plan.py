"""`ar2dlm plan`: the roofline's terms by hand on tiny configs, the MoE expert count, monotonicity, the CLI."""

from __future__ import annotations

import json
import random

import pytest
import torch
from conftest import ARCHS, VOCAB
from transformers import AutoModelForCausalLM

from ar2dlm.cli import main
from ar2dlm.core.errors import ConfigError
from ar2dlm.measure import plan
from ar2dlm.measure.tune import predicted_tpf

HW = plan.Hardware("test", bandwidth=1e12, flops=1e14, source="test")


def test_dense_terms_by_hand():
    c = ARCHS["llama"](VOCAB)  # untied: the input embedding is a lookup, the LM head a matrix read
    h, i, L, H, KV, d = c.hidden_size, c.intermediate_size, c.num_hidden_layers, 4, 2, c.hidden_size // 4
    per_layer = h * H * d + 2 * h * KV * d + H * d * h + 3 * h * i + 2 * h
    dense = L * per_layer + h + VOCAB * h
    s = plan.model_shape(c)
    assert s.dense_params == dense
    assert s.dense_params + VOCAB * h == sum(p.numel() for p in AutoModelForCausalLM.from_config(c).parameters())
    batch, ctx, n = 3, 50, 7
    t = plan.forward_cost(s, HW, "bfloat16", batch, ctx, n)
    assert t["weight_bytes"] == 2 * dense and t["expert_bytes"] == 0
    assert t["kv_bytes"] == 2 * (batch * ctx + batch * n) * L * 2 * KV * d
    assert t["linear_flops"] == 2 * batch * n * dense  # active params + LM head = every dense parameter here
    assert t["attention_flops"] == 4 * batch * n * (ctx + n) * H * d * L
    assert t["seconds"] == max(t["bytes"] / 1e12, t["flops"] / 1e14)
    assert plan.forward_cost(s, HW, "float32", batch, ctx, n)["weight_bytes"] == 4 * dense


def test_tied_embedding_counted_once():
    c = ARCHS["gpt2"](VOCAB)
    s = plan.model_shape(c)
    model = AutoModelForCausalLM.from_config(c)
    assert model.get_input_embeddings().weight is model.get_output_embeddings().weight
    assert s.dense_params == sum(p.numel() for p in model.parameters())  # parameters() lists the tied one once


def test_moe_experts_by_hand():
    c = ARCHS["qwen2_moe"](VOCAB)
    s = plan.model_shape(c)
    assert (s.experts, s.top_k, s.moe_layers) == (4, 2, 2)
    assert s.expert_params == 3 * c.hidden_size * c.moe_intermediate_size
    model = AutoModelForCausalLM.from_config(c)
    assert s.total_params == sum(p.numel() for p in model.parameters()) - VOCAB * c.hidden_size
    one = plan.forward_cost(s, HW, "bfloat16", 1, 10, 1)
    assert one["expert_bytes"] == 2 * 2 * 2 * s.expert_params  # 1 token, top-2: 2 experts in each of 2 layers
    many = plan.forward_cost(s, HW, "bfloat16", 4, 10, 16)
    assert many["expert_bytes"] == pytest.approx(2 * 2 * 4 * s.expert_params * (1 - 0.5 ** 64))


def test_expected_distinct_experts_formula():
    """E (1 - (1 - k/E)^T) against sampling uniform top-k sets."""
    rng = random.Random(0)
    for E, k, T in [(4, 2, 3), (16, 1, 10), (8, 2, 5)]:
        trials = 20000
        mean = sum(len({e for _ in range(T) for e in rng.sample(range(E), k)}) for _ in range(trials)) / trials
        assert mean == pytest.approx(plan.experts_touched(E, k, T), rel=0.02)
    assert plan.experts_touched(16, 1, 1) == 1 and plan.experts_touched(16, 1, 10 ** 4) == pytest.approx(16)


def test_cost_is_monotone():
    s = plan.model_shape(ARCHS["qwen2_moe"](VOCAB))
    secs = [plan.forward_cost(s, HW, "bfloat16", 2, 64, n)["seconds"] for n in range(1, 200, 7)]
    assert secs == sorted(secs)
    assert plan.forward_cost(s, HW, "bfloat16", 2, 128, 8)["seconds"] > plan.forward_cost(s, HW, "bfloat16", 2, 64, 8)["seconds"]
    assert plan.forward_cost(s, HW, "bfloat16", 4, 64, 8)["seconds"] > plan.forward_cost(s, HW, "bfloat16", 2, 64, 8)["seconds"]
    r = plan.plan(s, HW, plan.PlanConfig(hardware="mi300x", block_size=8, batch_size=2, context=64))
    costs = [x["relative_cost"] for x in r["curve"]]
    assert costs == sorted(costs) and costs[0] >= 1


def test_plan_uses_tunes_prediction():
    s = plan.model_shape(ARCHS["llama"](VOCAB))
    cfg = plan.PlanConfig(hardware="h100", context=200, block_size=6, acceptance=(0.9, 0.7))  # tiny: 256 positions
    r = plan.plan(s, plan.hardware("h100", "bfloat16"), cfg)
    a = [0.9, 0.7, 0.7, 0.7, 0.7]
    for b in r["best"]:
        assert b["predicted_tpf"] == round(predicted_tpf(a, b["draft_len"], b["proposals"]), 3)
        assert b["predicted_speedup"] == pytest.approx(b["predicted_tpf"] / b["relative_cost"], rel=2e-3)


def test_zaya_shipped_config():
    """The shipped ZAYA1-8B config is transformers' ZayaConfig() defaults; its CCA conv and delayed-value
    state per row by hand."""
    from transformers import ZayaConfig

    c = plan.load_config("zaya1-8b")
    d = ZayaConfig()
    for f in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
              "num_experts", "num_experts_per_tok", "moe_intermediate_size", "vocab_size", "cca_time0", "cca_time1"):
        assert getattr(c, f) == getattr(d, f)
    s = plan.model_shape(c)
    assert (s.experts, s.top_k, s.q_heads // s.kv_heads) == (16, 1, 4)  # CCGQA 4:1
    assert s.state_per_row == 40 * ((8 + 2) * 128 * (1 + 1) + 2 * 128 // 2)
    with torch.device("meta"):
        assert s.total_params == sum(p.numel() for p in AutoModelForCausalLM.from_config(c).parameters())


def test_settings_are_validated():
    for kw, field in (({"hardware": "mi300x", "dtype": "float32"}, "dtype"), ({"acceptance": (1.5,)}, "acceptance"),
                      ({"hardware": "tpu"}, "hardware"), ({"context": 2.5}, "context")):
        with pytest.raises(ConfigError) as e:
            plan.PlanConfig(**kw)
        assert e.value.field == field, e.value


def test_cli_plan(capsys, tmp_path):
    assert main(["plan", "zaya1-8b", "--hardware", "mi355x", "--batch-size", "32", "--acceptance", "0.9,0.8"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert any("seed figure: about 5" in line for line in out)
    result = json.loads(out[-1])
    assert result["settings"]["acceptance"] == [0.9, 0.8] and result["best"]
    ARCHS["qwen3"](VOCAB).save_pretrained(tmp_path)
    assert main(["plan", str(tmp_path / "config.json"), "--hardware", "h200", "--block-size", "4", "--context",
                 "200"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["model"] == "qwen3"
    assert main(["plan", "zaya1-8b", "--hardware", "b200", "--dtype", "float32"]) == 2
    assert "float32" in capsys.readouterr().err
    assert main(["plan", str(tmp_path / "nope"), "--hardware", "h100"]) == 2
