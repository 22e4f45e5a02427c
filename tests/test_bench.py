"""`ar2dlm bench` runs end to end on a tiny model: table, plots, JSON with every configuration."""

from __future__ import annotations

import copy
import json

import torch
from conftest import EOS, save_base
from transformers import AutoModelForCausalLM

from ar2dlm.cli import main
from ar2dlm.decode import costs
from ar2dlm.decode.engine import generate
from ar2dlm.measure import bench
from ar2dlm.model.lm import DiffusionLM


def test_bench_reports_every_configuration(converted_dirs, base_dirs, tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": f"w{i} w{i + 3} w{i + 7}"}) for i in range(2, 6)) + "\n")
    out = tmp_path / "bench"
    code = main(["bench", str(converted_dirs["llama"]), "--sets", str(prompts), "--n-prompts", "3",
                 "--batch-sizes", "1,2", "--runs", "1", "--max-new-tokens", "12", "--draft-lens", "2,4",
                 "--proposals", "1,2", "--mix-weights", "0,1", "--samplers", "greedy,lossless,adaptive",
                 "--reference", str(base_dirs["llama"]), "--prompt-lengths", "20,40", "--out", str(out)])
    assert code == 0
    stdout = capsys.readouterr().out.strip().splitlines()
    report = json.loads(stdout[-1])
    rows = report["results"]
    configs = {(r["batch_size"], r["config"]) for r in rows}
    # greedy_exact_match's oracle: the same prompts decoded here, greedy mix against the AR loop, prompt by prompt
    lm = DiffusionLM.from_pretrained(converted_dirs["llama"])
    ids, eos = bench.load_prompt_set(lm, str(prompts), 3), tuple(bench.default_eos(lm))
    ar = [g.token_ids for g in generate(lm, ids, lm.decode_config(ar=True, max_new_tokens=12, eos_token_id=eos))]
    mix_match = {}
    for K in (2, 4):
        for n in (1, 2):
            cfg = lm.decode_config(draft_len=K, proposals=n, adaptive=False, sampler="mix", mix_weight=1.0,
                                   temperature=0.0, max_new_tokens=12, eos_token_id=eos)
            same = [g.token_ids == a for g, a in zip(generate(lm, ids, cfg), ar)]
            mix_match[K, n] = round(sum(same) / len(ids), 3)
    for bs in (1, 2):
        assert {(bs, "ar"), (bs, "hf_generate"), (bs, "hf_generate_stock"), (bs, "default"), (bs, "ar_sample"),
                (bs, "default_lossless")} <= configs
        for K in (2, 4):
            for n in (1, 2):
                for s in ("greedy", "lossless", "adaptive", "mix0", "mix1"):
                    assert (bs, f"{s}_K{K}_R{n}") in configs
    assert [r["exact_match"] for r in report["reference"]] == [1.0]  # its own base: AR output unchanged
    assert (1, "hf_prompt_lookup") in configs and (2, "hf_prompt_lookup") not in configs  # HF: batch 1 only
    for r in rows:
        assert r["tokens_per_s"] > 0
        if r["config"] == "ar":
            assert r["speedup_vs_ar"] == 1.0 and r["tpf"] == 1.0
        if r.get("sampler") in ("lossless", "mix") and r["kind"] == "ar2dlm":
            assert r["temperature"] == 0.7 and r["speedup_vs_ar_sample"] > 0  # against AR sampling at 0.7
        if r.get("sampler") == "greedy" or r["config"] == "default":
            assert r["equals_ar"] is True and r["tpf"] >= 1.0 and sum(r["accepted_hist"].values()) > 0
        if "accepted_hist" in r:  # every step is of one candidate kind: the shares add up, as do the steps
            kinds = r["by_kind"]
            assert sum(k["steps"] for k in kinds.values()) == sum(r["accepted_hist"].values())
            assert abs(sum(k["share"] for k in kinds.values()) - 1) < 0.01
            assert all(k["tau"] >= 1 for k in kinds.values())
            allowed = {"ar"} if r["config"] in ("ar", "ar_sample") else {"ar", "model", "suffix"}
            assert set(kinds) <= (allowed | {"tree"} if r.get("tree") else allowed)
            assert "tree" in kinds or not r.get("tree") or kinds.get("suffix", {}).get("share") == 1
        if r.get("sampler") == "mix":
            assert "nll_vs_lossless" in r
            # w = 0 verifies against the AR logits alone: greedy mix is AR greedy on every prompt
            assert r["greedy_exact_match"] == (1.0 if r["mix_weight"] == 0 else
                                               mix_match[r["draft_len"], r["proposals"]]), r["config"]
    assert any("tpf" in line and "speedup_vs_ar" in line for line in stdout)  # the table
    scaling = report["context_scaling"]  # decode-only speed by prompt length
    assert [r["prompt_tokens"] for r in scaling] == [20, 40]
    for r in scaling:
        assert r["ar_tokens_per_s"] > 0 and r["decode_tpf"] >= 1.0
        assert abs(r["speedup_vs_ar"] - r["default_tokens_per_s"] / r["ar_tokens_per_s"]) < 0.01
    assert any("decode-only speed by prompt length" in line for line in stdout)
    for name in ("speedup_vs_mix_weight.png", "tpf_vs_draft_len.png", "accepted_hist.png", "bench.json"):
        assert (out / name).stat().st_size > 0


def test_tune_writes_defaults(drafter, tmp_path, capsys):
    """tune on a drafter that is often accepted picks a drafting setting and writes it to ar2dlm.json."""
    from ar2dlm.measure.tune import predicted_tpf, tree_gain
    from ar2dlm.model.lm import DiffusionLM
    from ar2dlm.model.settings import DiffusionConfig

    out = tmp_path / "drafter"
    drafter.model.save_pretrained(out)
    drafter.tokenizer.save_pretrained(out)
    drafter.settings.save(out)
    prompts = tmp_path / "p.jsonl"
    words = " ".join(f"w{t}" for t in drafter.pattern[:3])
    prompts.write_text("\n".join(json.dumps({"prompt": words}) for _ in range(2)) + "\n")
    assert main(["tune", str(out), "--sets", str(prompts), "--n-prompts", "2", "--max-draft-len", "8",
                 "--max-new-tokens", "24", "--grid"]) == 0
    stdout = capsys.readouterr().out.strip().splitlines()
    result = json.loads(stdout[-1])
    grid = result["grid_search"]  # --grid: every setting timed on the same prompts, the choice among them
    assert {(r["draft_len"], r["proposals"]) for r in grid["grid"]} >= {(4, 1), (8, 3)}
    assert abs(grid["chosen"]["tokens_per_s"] / grid["best"]["tokens_per_s"] - grid["chosen_vs_best"]) < 1e-2
    assert 0 < grid["chosen_vs_best"] <= 1 and any("of the grid's best" in line for line in stdout)
    saved = DiffusionConfig.load(out)
    assert (saved.draft_len, saved.proposals) == (result["best"]["draft_len"], result["best"]["proposals"])
    assert saved.forward_cost["slots"]["1"] == 1.0  # with the machine it holds for, which is this one
    assert saved.forward_cost["machine"] == result["machine_key"] == costs.machine_key(torch.float32)
    assert result["candidates"][0]["predicted_tpf"] > 1.5  # the drafter is accepted, and tune saw it
    assert any(c.get("adaptive") for c in result["candidates"])  # adaptive drafting is timed too
    assert saved.adaptive == bool(result["best"].get("adaptive"))
    # the cost table with and without the drafting machinery, and the engine's own work per step
    assert result["base_forward_cost"].keys() == result["forward_cost"].keys()
    assert any("drafting machinery" in line for line in stdout)
    assert all("engine_cost" in c for c in result["candidates"])
    lm = DiffusionLM.from_pretrained(out)
    assert lm.decode_config().draft_len == saved.draft_len
    assert lm.decode_config().adaptive == saved.adaptive and lm.decode_config(ar=True).adaptive is False
    assert lm.decode_config(draft_len=4).adaptive is False  # fixing the drafting turns the default off
    # the predictor: certain acceptance with every proposal -> K tokens per step; none -> 1
    assert abs(predicted_tpf([1.0] * 7, 8, 8) - 8) < 1e-9 and abs(predicted_tpf([0.0] * 7, 8, 3) - 1) < 1e-9
    # candidate trees: priced from the measured sibling ranks, and written with the rest
    rates = result["sibling_rates"]
    assert rates and all(r[0] == 0 and r == sorted(r) and r[-1] <= 1 for r in rates)
    assert any(p.get("tree") for p in result["predictions"]) and saved.tree == tuple(result["best"]["tree"])
    assert lm.decode_config().tree == saved.tree and lm.decode_config(draft_len=4).tree == ()
    # a tree's gain: where the chain always stops at depth 1, a sibling that always holds the token adds 1
    assert abs(tree_gain([0.0] * 7, [[0.0, 1.0]], 8, (1,)) - 1) < 1e-9 and tree_gain([1.0] * 7, [[0, 1]], 8, (1,)) == 0


def test_bench_reference_drift(converted_dirs, base_dirs, tmp_path):
    """--reference compares the model's AR greedy output with another model's, against HF generate as oracle."""
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": f"w{i} w{i + 3} w{i + 7}"}) for i in range(2, 6)) + "\n")
    lm = DiffusionLM.from_pretrained(converted_dirs["llama"])
    kw = dict(sets=[str(prompts)], n_prompts=4, batch_sizes=[1], runs=1, max_new_tokens=10, draft_lens=[2],
              proposals=[1], mix_weights=[], samplers=["greedy"], hf=False, log=lambda *a, **k: None)

    same = bench.bench(lm, reference=DiffusionLM.from_pretrained(base_dirs["llama"], allow_ar=True), **kw)["reference"]
    assert len(same) == 1 and same[0]["exact_match"] == 1.0 and same[0]["reference_nll_drift"] == 0.0
    assert same[0]["mean_common_prefix"] == 10.0  # no EOS: every output is max_new_tokens long

    other_dir = save_base("llama", tmp_path / "other", seed=1)
    report = bench.bench(lm, reference=DiffusionLM.from_pretrained(other_dir, allow_ar=True), **kw)
    drift = report["reference"][0]
    ids = [lm.encode([f"w{i} w{i + 3} w{i + 7}"])[0] for i in range(2, 6)]
    ours, theirs = (
        [m.generate(input_ids=torch.tensor([p]), do_sample=False, max_new_tokens=10, eos_token_id=EOS)[0, len(p):]
         .tolist() for p in ids]
        for m in (AutoModelForCausalLM.from_pretrained(base_dirs["llama"]),
                  AutoModelForCausalLM.from_pretrained(other_dir)))
    assert ours != theirs  # the oracle sees two different models
    assert drift["exact_match"] == sum(a == b for a, b in zip(ours, theirs)) / 4
    assert drift["reference_nll"] > drift["reference_nll_own"]  # the reference's own greedy text is likelier to it
    assert "vs reference" in bench.table(report)


def test_the_fp32_stock_row_runs_the_weights_in_float32_and_restores_them(converted_dirs):
    """A bf16 model's bench has HF generate of its weights in float32 (the base as HF loads it by default): inside,
    the forward is the float32 model's; after, every tensor is the one it had, bit for bit."""
    names = {s.name for s in bench.specs_for(DiffusionLM.from_pretrained(converted_dirs["llama"], dtype="float32"),
                                             [2], [1], [], ["greedy"])}
    assert "hf_generate_stock" in names and "hf_generate_stock_fp32" not in names  # fp32 already: nothing to add
    lm = DiffusionLM.from_pretrained(converted_dirs["llama"], dtype="bfloat16")
    assert "hf_generate_stock_fp32" in {s.name for s in bench.specs_for(lm, [2], [1], [], ["greedy"])}
    model = lm.model
    ids = torch.tensor([[3, 5, 7, 11, 13, 17]])
    tensors = [*model.parameters(), *model.buffers()]
    before = [(t.dtype, t.data_ptr(), t.detach().clone()) for t in tensors]
    with torch.inference_mode(), lm.base_weights(), lm.plain():
        bf16 = model(input_ids=ids).logits
        upcast = copy.deepcopy(model).float()
        with bench.float32_weights(model):
            assert {t.dtype for t in model.parameters()} == {torch.float32}
            inside = model(input_ids=ids).logits
        after = model(input_ids=ids).logits
        assert inside.dtype == torch.float32 and torch.equal(inside, upcast(input_ids=ids).logits)
    assert torch.equal(after, bf16) and after.dtype == torch.bfloat16
    for t, (dtype, ptr, value) in zip(tensors, before):
        assert t.dtype == dtype and t.data_ptr() == ptr and torch.equal(t, value)
