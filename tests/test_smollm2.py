"""The bundled SmolLM2-135M-Instruct after conversion: engine == reference decoder == HF generate."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from ar2dlm import convert
from ar2dlm.decode.reference import tidar_greedy
from ar2dlm.model.bundled import resolve_base
from ar2dlm.model.lm import DiffusionLM

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    out = convert("smollm2-135m", tmp_path_factory.mktemp("smol") / "tidar", block_size=8)
    return DiffusionLM.from_pretrained(out)


def test_engine_equals_reference_and_hf_generate(smol):
    base = AutoModelForCausalLM.from_pretrained(resolve_base("smollm2-135m")).eval()
    prompts = ["Write a Python function that reverses a string.", "What is the capital of France?"]
    ids = smol.encode(prompts, chat=True)
    eos = set(smol.tokenizer.convert_tokens_to_ids(["<|im_end|>"]))
    for p in ids:
        hf = base.generate(torch.tensor([p]), do_sample=False, max_new_tokens=24, eos_token_id=list(eos),
                           pad_token_id=0)[0, len(p):].tolist()
        ref, ref_forwards = tidar_greedy(smol, p, 24, 4, eos)
        g = smol.generate([p], max_new_tokens=24, draft_len=4, proposals=4, eos_token_id=list(eos))[0]
        assert g.token_ids == ref == hf
        assert g.stats.forwards == ref_forwards
    batch = smol.generate(ids, max_new_tokens=24, draft_len=8, proposals=3, eos_token_id=list(eos))
    alone = [smol.generate([p], max_new_tokens=24, ar=True, eos_token_id=list(eos))[0] for p in ids]
    assert [g.token_ids for g in batch] == [g.token_ids for g in alone]


def test_shipped_drafter_is_exact_and_drafts(smol):
    """`smollm2-135m` loads the drafter shipped in the package: greedy == reference == base HF generate,
    and it drafts far better than the untrained conversion on held-out (bench) code prompts."""
    from ar2dlm.model.bundled import ar2dlm_home
    from ar2dlm.train.prompts import load_prompts

    lm = DiffusionLM.from_pretrained("smollm2-135m")
    assert lm.settings.adapter == "drafting" and lm.source.parent == ar2dlm_home()
    base = AutoModelForCausalLM.from_pretrained(resolve_base("smollm2-135m")).eval()
    eos = sorted(set(lm.tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])))
    tpf = {"shipped": [], "untrained": []}
    for record in load_prompts("code", "bench")[:2]:
        p = lm.encode([record["prompt"]])[0]
        hf = base.generate(torch.tensor([p]), do_sample=False, max_new_tokens=48, eos_token_id=eos,
                           pad_token_id=0)[0, len(p):].tolist()
        ref, ref_forwards = tidar_greedy(lm, p, 48, 8, set(eos))
        g = lm.generate([p], max_new_tokens=48, draft_len=8, proposals=8, eos_token_id=eos)[0]
        assert g.token_ids == ref == hf and g.stats.forwards == ref_forwards
        # the drafters themselves: the model's drafts only (suffix candidates would lift both alike)
        d = lm.generate([p], max_new_tokens=48, draft_len=8, proposals=8, eos_token_id=eos, candidates="diffusion")[0]
        assert d.token_ids == hf
        tpf["shipped"].append(d.stats.tpf)
        u = smol.generate([p], max_new_tokens=48, draft_len=8, proposals=8, eos_token_id=eos,
                          candidates="diffusion")[0]
        assert u.token_ids == hf
        tpf["untrained"].append(u.stats.tpf)
    assert min(tpf["shipped"]) > max(tpf["untrained"]) + 0.5, tpf


def test_bf16_greedy_equals_the_bf16_ar_loop_on_the_bench_prompts():
    """The per-dtype contract on the bundled model and its shipped drafter: in bf16 (batch-invariant), greedy ==
    the bf16 AR loop token for token on every bench prompt set, at batch 1 and in a ragged batch of 4."""
    from ar2dlm.measure.bench import load_prompt_set

    lm = DiffusionLM.from_pretrained("smollm2-135m", dtype="bfloat16")
    assert lm.batch_invariant and lm.model.dtype == torch.bfloat16
    prompts = [p for s in ("code", "chat", "prose") for p in load_prompt_set(lm, s, 2)][:4]
    ar = [g.token_ids for g in lm.generate(prompts, max_new_tokens=40, ar=True)]
    assert ar == [lm.generate([p], max_new_tokens=40, ar=True)[0].token_ids for p in prompts]
    for K, R in ((4, 1), (8, 3)):
        assert [g.token_ids for g in lm.generate(prompts, max_new_tokens=40, draft_len=K, proposals=R)] == ar
        assert [lm.generate([p], max_new_tokens=40, draft_len=K, proposals=R)[0].token_ids for p in prompts] == ar
