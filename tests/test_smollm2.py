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
    for i, record in enumerate(load_prompts("code", "bench")[:2]):
        p = lm.encode([record["prompt"]])[0]
        hf = base.generate(torch.tensor([p]), do_sample=False, max_new_tokens=48, eos_token_id=eos,
                           pad_token_id=0)[0, len(p):].tolist()
        g = lm.generate([p], max_new_tokens=48, draft_len=8, proposals=8, eos_token_id=eos)[0]
        assert g.token_ids == hf
        if i == 0:  # the naive reference (every step recomputed from scratch) on the first prompt's start
            ref, ref_forwards = tidar_greedy(lm, p, 24, 8, set(eos))
            short = lm.generate([p], max_new_tokens=24, draft_len=8, proposals=8, eos_token_id=eos)[0]
            assert short.token_ids == ref == hf[:24] and short.stats.forwards == ref_forwards
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
    assert [g.token_ids for g in lm.generate(prompts, max_new_tokens=40, draft_len=4, proposals=1)] == ar
    assert [lm.generate([p], max_new_tokens=40, draft_len=8, proposals=3)[0].token_ids for p in prompts] == ar


@pytest.fixture(scope="module")
def smol_bf16():
    lm = DiffusionLM.from_pretrained("smollm2-135m", dtype="bfloat16")
    assert lm.batch_invariant and lm.lean is not None
    return lm


def _unseen_text() -> list[str]:
    """Texts no other test decodes: HumanEval problems from the back of the file, and chat questions."""
    from ar2dlm.evaluate.tasks import humaneval_problems

    code = [p.prompt for p in humaneval_problems("completion")[-40::10]]
    chat = ["What is the difference between a list and a tuple in Python?", "Give me three tips for sleeping well.",
            "Why do cats purr?"]
    return code + chat


def test_bf16_rows_of_a_step_equal_the_row_alone_from_30_to_3000_keys(smol_bf16):
    """The property through DiffusionLM.forward on real text: every row of a 2-16-row cached step (verify rows)
    has the logits and K/V of the same row fed alone, bitwise, over 30 to 3,000 keys of context."""
    import copy

    from ar2dlm.nn import predecessors

    lm = smol_bf16
    text = "\n\n".join(_unseen_text()) * 6
    ids = torch.tensor(lm.tokenizer(text)["input_ids"])
    assert len(ids) > 3100
    with torch.inference_mode():
        for context, M in ((30, 2), (301, 16), (1187, 9), (3000, 16)):
            cache = predecessors.new_cache(lm.model)
            lm.forward(ids[None, :context], torch.arange(context)[None],
                       torch.ones(context, context, dtype=torch.bool).tril()[None], None, cache)
            rows = ids[None, context:context + M]
            many, one = copy.deepcopy(cache), copy.deepcopy(cache)
            allowed = torch.cat([torch.ones(M, context, dtype=torch.bool),
                                 torch.ones(M, M, dtype=torch.bool).tril()], 1)[None]
            logits = lm.forward(rows, context + torch.arange(M)[None], allowed, None, many)
            for j in range(M):
                single = lm.forward(rows[:, j:j + 1], torch.tensor([[context + j]]),
                                    torch.ones(1, 1, context + j + 1, dtype=torch.bool), None, one)
                assert torch.equal(logits[0, j], single[0, 0]), (context, M, j)
            for a, b in zip(many.layers, one.layers):
                assert torch.equal(a.keys[..., context:context + M, :], b.keys[..., context:context + M, :])
                assert torch.equal(a.values[..., context:context + M, :], b.values[..., context:context + M, :])


def test_bf16_greedy_equals_the_bf16_ar_loop_on_unseen_prompts(smol_bf16):
    """Greedy (model drafts, proposals, suffix candidates) == the bf16 AR loop on prompts no other test uses, alone
    and in a ragged batch, and on a prompt of 1,500 tokens (rows at up to 3,000 keys:
    test_bf16_rows_of_a_step_equal_the_row_alone_from_30_to_3000_keys)."""
    lm = smol_bf16
    texts = _unseen_text()
    prompts = [lm.encode([t], chat=i >= len(texts) - 3)[0] for i, t in enumerate(texts)]
    ar = [lm.generate([p], max_new_tokens=20, ar=True)[0].token_ids for p in prompts]
    assert [lm.generate([p], max_new_tokens=20, draft_len=8, proposals=3)[0].token_ids for p in prompts] == ar
    assert [g.token_ids for g in lm.generate(prompts, max_new_tokens=20, draft_len=16, proposals=2)] == ar
    long = lm.encode(["\n\n".join(texts * 6)])[0][:1500]
    ar_long = lm.generate([long], max_new_tokens=24, ar=True)[0].token_ids
    assert lm.generate([long], max_new_tokens=24, draft_len=8, proposals=2)[0].token_ids == ar_long
    assert lm.generate([long, prompts[0]], max_new_tokens=24, draft_len=8)[0].token_ids == ar_long
