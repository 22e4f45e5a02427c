"""The decode engine against its oracles: HF generate, full recomputation, the naive reference decoders."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import CORE_ARCHS, EOS, make_tokenizer, tiny_model
from transformers import DynamicCache

from ar2dlm.decode import engine
from ar2dlm.decode import step as steps
from ar2dlm.decode.interface import DecodeModel
from ar2dlm.decode.reference import ar_greedy, tidar_greedy
from ar2dlm.model.convert import add_mask_token
from ar2dlm.model.lm import DiffusionLM
from ar2dlm.model.settings import DiffusionConfig
from ar2dlm.nn import masks, predecessors

SETTINGS = [(1, 1), (4, 1), (4, 3), (4, 4), (16, 1), (16, 3), (16, 16)]  # (K, |R|)
N_PROMPTS, NEW = 20, 24


def converted(arch, seed=0):
    """(HF base model, DiffusionLM of its conversion), float64 so no near-tie can flip an argmax."""
    base = tiny_model(arch, seed, torch.float64)
    model = tiny_model(arch, seed, torch.float64)
    tok = make_tokenizer()
    mask_id = add_mask_token(model, tok)
    return base, DiffusionLM(model, tok, DiffusionConfig(block_size=4, mask_token_id=mask_id))


def random_prompts(n, seed, vocab=96, lo=2, hi=14):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, vocab, (int(m),), generator=g).tolist() for m in torch.randint(lo, hi, (n,), generator=g)]


def hf_greedy(model, prompt, new=NEW, suppress=None):
    out = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=new, eos_token_id=EOS,
                         pad_token_id=0, suppress_tokens=suppress)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("arch", CORE_ARCHS)
def test_greedy_equals_hf_generate(arch):
    base, lm = converted(arch)
    prompts = random_prompts(N_PROMPTS, seed=1)
    expected = [hf_greedy(base, p) for p in prompts]
    for K, R in SETTINGS:
        alone = [lm.generate([p], max_new_tokens=NEW, draft_len=K, proposals=R)[0].token_ids for p in prompts]
        assert alone == expected, (K, R)
        batched = []
        for i in range(0, N_PROMPTS, 4):  # batches of 4 prompts of different lengths
            batched += [g.token_ids for g in lm.generate(prompts[i:i + 4], max_new_tokens=NEW, draft_len=K,
                                                         proposals=R)]
        assert batched == expected, (K, R)


def test_greedy_with_accepting_drafter_equals_hf(drafter):
    """A trained drafter: most drafts are accepted, so every accept branch runs."""
    pattern = drafter.pattern
    prompts = [pattern[i:i + 3] for i in range(4)] + random_prompts(16, seed=2)
    suppress = [drafter.mask_token_id]
    expected = [hf_greedy(drafter.model, p, 40, suppress) for p in prompts]
    for K, R in SETTINGS:
        gens = [lm_g for i in range(0, len(prompts), 4)
                for lm_g in drafter.generate(prompts[i:i + 4], max_new_tokens=40, draft_len=K, proposals=R)]
        assert [g.token_ids for g in gens] == expected, (K, R)
        alone = [drafter.generate([p], max_new_tokens=40, draft_len=K, proposals=R)[0] for p in prompts]
        assert [g.token_ids for g in alone] == expected, (K, R)
        if K > 1:
            tpf = sum(g.stats.tpf for g in alone) / len(alone)
            assert tpf > 2.0, f"drafter should be accepted often (K={K}, R={R}, mean TPF {tpf:.2f})"
            if K == 4:  # the block size it was trained at
                assert any(k == K for g in alone for k in g.stats.accepted), "some step accepted the whole draft"


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_reference_decoders_agree_with_engine(arch, drafter):
    for lm in (converted(arch)[1], drafter):
        for p in random_prompts(4, seed=3):
            ar = ar_greedy(lm, p, 20, {EOS})
            assert lm.generate([p], max_new_tokens=20, ar=True)[0].token_ids == ar
            for K in (1, 4):
                toks, forwards = tidar_greedy(lm, p, 20, K, {EOS})
                g = lm.generate([p], max_new_tokens=20, draft_len=K, proposals=K)[0]
                assert toks == ar and g.token_ids == toks
                assert g.stats.forwards == forwards  # same drafts, same acceptance, step for step


def test_cached_step_equals_full_recomputation():
    """A step over a cache (with a hole) gives the logits of one forward over everything."""
    _, lm = converted("llama")
    torch.manual_seed(0)
    prefix, draft, K = torch.randint(2, 96, (1, 9)), torch.randint(2, 96, (1, 4)), 4
    R = torch.tensor([[1, 3]])
    M = lm.mask_token_id
    # cached: prefill prefix (slot 5 is a hole: a rejected token left in the cache), then the step
    cache = DynamicCache()
    valid = torch.ones(1, 9, dtype=torch.bool)
    valid[0, 5] = False
    pre_mask = masks.causal_mask(9) & valid[:, None, :]
    pre_mask |= torch.eye(9, dtype=torch.bool)[None]
    pos_prefix = torch.tensor([[0, 1, 2, 3, 4, 99, 5, 6, 7]])  # the hole's position is irrelevant
    lm.forward(prefix, pos_prefix, pre_mask, None, cache)
    L = 8  # committed tokens (9 slots, one hole)
    ids = torch.cat([draft, torch.full((1, 2 * K), M)], 1)
    pos = torch.cat([L + torch.arange(K), L + 1 + torch.arange(K), L + 3 + torch.arange(K)])[None]
    step = lm.forward(ids, pos, masks.step_mask(valid, K, R), None, cache)
    # full: committed tokens only, no cache
    committed = prefix[:, valid[0]]
    full_ids = torch.cat([committed, ids], 1)
    full_pos = torch.cat([torch.arange(L)[None], pos], 1)
    full_mask = masks.step_mask(torch.zeros(1, 0, dtype=torch.bool), K, R)
    big = torch.zeros(1, L + 3 * K, L + 3 * K, dtype=torch.bool)
    big[:, :L, :L] = masks.causal_mask(L)
    big[:, L:, :L] = True
    big[:, L:, L:] = full_mask
    full = lm.forward(full_ids, full_pos, big, None)
    torch.testing.assert_close(step[0], full[0, L:], rtol=1e-9, atol=1e-9)


def test_crop_is_as_if_never_seen():
    _, lm = converted("qwen2")
    torch.manual_seed(1)
    a, rejected, b = torch.randint(2, 96, (1, 6)), torch.randint(2, 96, (1, 3)), torch.randint(2, 96, (1, 2))
    cache = DynamicCache()
    lm.forward(a, torch.arange(6)[None], masks.causal_mask(6), None, cache)
    lm.forward(rejected, torch.arange(6, 9)[None], torch.ones(1, 3, 9, dtype=torch.bool) & _causal_tail(6, 3), None,
               cache)
    predecessors.crop(cache, 3)
    after = lm.forward(b, torch.arange(6, 8)[None], _causal_tail(6, 2), None, cache)
    fresh = lm.forward(torch.cat([a, b], 1), torch.arange(8)[None], masks.causal_mask(8), None)
    torch.testing.assert_close(after[0], fresh[0, 6:], rtol=1e-9, atol=1e-9)


def _causal_tail(past, q):
    m = torch.ones(1, q, past + q, dtype=torch.bool)
    m[0, :, past:] = masks.causal_mask(q)[0]
    return m


def test_compaction_keeps_results(drafter):
    """Squeezing holes out of the cache changes nothing."""
    prompts = random_prompts(4, seed=5) + [drafter.pattern[:4]]
    cfg = drafter.decode_config(max_new_tokens=30, draft_len=4, proposals=2)
    g = torch.Generator()
    with torch.inference_mode():
        state, _ = steps.prefill(drafter, prompts, 4, cfg, g)
        for _ in range(3):
            steps.step(drafter, state, 2, cfg, g)
        assert not state.cache_valid.all() and state.holes  # ragged: holes exist, and the state knows
        twin = copy.deepcopy(state)
        steps.compact_cache(twin)
        assert twin.cache_valid.shape[1] < state.cache_valid.shape[1]
        for _ in range(3):
            one, two = steps.step(drafter, state, 2, cfg, g), steps.step(drafter, twin, 2, cfg, g)
            assert one == two


def test_eos_and_stop_strings():
    base, lm = converted("llama")
    p = random_prompts(1, seed=7)[0]
    free = lm.generate([p], max_new_tokens=NEW, eos_token_id=())[0]
    assert free.finish_reason == "length" and len(free.token_ids) == NEW
    eos = free.token_ids[5]
    stopped = lm.generate([p], max_new_tokens=NEW, eos_token_id=[eos], draft_len=4)[0]
    assert stopped.token_ids == free.token_ids[:free.token_ids.index(eos) + 1]
    assert stopped.finish_reason == "eos"
    word = free.text.split()[6]
    cut = lm.generate([p], max_new_tokens=NEW, eos_token_id=(), stop=[word], draft_len=4)[0]
    assert cut.finish_reason == "stop" and cut.text == free.text[:free.text.index(word)]


def test_stream_yields_the_generated_text(drafter):
    p = drafter.pattern[:3]
    whole = drafter.generate([p], max_new_tokens=30, draft_len=4, proposals=2)[0]
    pieces = list(drafter.stream(p, max_new_tokens=30, draft_len=4, proposals=2))
    assert "".join(pieces) == whole.text and len(pieces) > 1


def test_mask_token_is_never_emitted():
    """Even a model that loves the mask token never emits it."""
    _, lm = converted("llama")
    with torch.no_grad():
        lm.model.lm_head.bias = None
        lm.model.lm_head.weight[lm.mask_token_id] *= 0
        lm.model.lm_head.weight[lm.mask_token_id] += 50 * lm.model.lm_head.weight[2:10].mean(0)
    for sampler in ("greedy", "lossless", "mix"):
        extra = {"mix_weight": 0.5} if sampler == "mix" else {}
        for g in lm.generate(random_prompts(3, seed=8), max_new_tokens=16, draft_len=4, sampler=sampler, seed=0,
                             **extra):
            assert lm.mask_token_id not in g.token_ids


def test_ar_loop_is_one_token_per_forward():
    _, lm = converted("gpt2")
    g = lm.generate(random_prompts(1, seed=9), max_new_tokens=12, ar=True, eos_token_id=())[0]
    assert g.stats.forwards == 12 and g.stats.tpf == 1.0


def test_adaptive_drafting_keeps_greedy_exact_and_adapts(drafter):
    """Adaptive drafting changes K step to step; tokens stay AR greedy's. It drafts long on the pattern the
    drafter knows and falls back to short drafts / AR steps where drafts fail."""
    from ar2dlm.decode.policy import AdaptiveDraft, CostModel

    prompts = [drafter.pattern[:3]] + random_prompts(6, seed=21)
    suppress = [drafter.mask_token_id]
    for p in prompts:
        g = drafter.generate([p], max_new_tokens=40, draft_len=8, proposals=2, adaptive=True)[0]
        assert g.token_ids == hf_greedy(drafter.model, p, 40, suppress)
    batch = drafter.generate(prompts, max_new_tokens=40, draft_len=8, proposals=2, adaptive=True)
    assert [g.token_ids for g in batch] == [hf_greedy(drafter.model, p, 40, suppress) for p in prompts]
    # the controller: high acceptance -> long drafts; none -> plain AR steps; recovers after
    ctl = AdaptiveDraft(16, 3, CostModel({1: 1.0, 64: 2.0}))
    for _ in range(20):
        ctl.update([8], [8])
    assert ctl.choose()[0] >= 8
    choices = []
    for _ in range(60):  # every draft rejected: mostly plain AR steps, with an occasional cheap probe
        choices.append(ctl.choose()[0])
        ctl.update([1], [choices[-1]])
    assert choices[-40:].count(1) >= 30  # a probe now and then, when the estimates have drifted back
    for _ in range(40):  # acceptance returns: drafts grow again
        K = ctl.choose()[0]
        ctl.update([K], [K])
    assert ctl.choose()[0] >= 8


def test_adaptive_default_that_never_drafts_runs_the_ar_loop(drafter):
    """When drafting cannot pay at the controller's prior, no step would ever draft: the request runs as the
    AR loop (one row per forward, no P_0 slots at prefill), and its tokens are AR greedy's."""
    import dataclasses

    p = drafter.pattern[:3]
    want = hf_greedy(drafter.model, p, 20, [drafter.mask_token_id])
    saved = drafter.settings
    rows = []
    hook = drafter.model.register_forward_pre_hook(lambda m, a, kw: rows.append(kw["input_ids"].shape[1]),
                                                   with_kwargs=True)
    try:
        from ar2dlm.decode.costs import as_saved, machine_key

        table = as_saved({1: 1.0, 2: 3.0, 64: 200.0}, machine_key(drafter.model.dtype))  # measured "here"
        drafter.settings = dataclasses.replace(saved, forward_cost=table)
        g = drafter.generate([p], max_new_tokens=20, draft_len=8, proposals=2, adaptive=True)[0]
        assert g.token_ids == want
        assert rows == [len(p)] + [1] * (len(rows) - 1) and g.stats.forwards == 20
        rows.clear()
        drafter.settings = saved  # this machine's measured costs: a tiny model's rows are ~free, so it drafts
        drafter.generate([p], max_new_tokens=20, draft_len=8, proposals=2, adaptive=True)
        assert rows[0] > len(p) and max(rows[1:]) > 1
    finally:
        drafter.settings = saved
        hook.remove()


def test_cost_model_interpolates():
    from ar2dlm.decode.policy import CostModel

    c = CostModel({1: 1.0, 9: 2.0, 17: 4.0})
    assert c(1) == 1.0 and c(5) == 1.5 and c(13) == 3.0 and c(25) == 6.0
    assert CostModel()(1) == 1.0 and CostModel()(21) > 1.5


def test_sliding_window_models_decode_past_the_window():
    """A window set on a loaded model's config: each sliding layer reads its own window past the edge
    (tests/test_sliding.py holds every windowed family to HF generate)."""
    base = tiny_model("mistral", 0, torch.float64)
    base.config.sliding_window = 24
    model = tiny_model("mistral", 0, torch.float64)
    model.config.sliding_window = 24
    tok = make_tokenizer()
    lm = DiffusionLM(model, tok, DiffusionConfig(block_size=4, mask_token_id=add_mask_token(model, tok)))
    assert lm.windows == {"sliding_attention": 24}
    p = random_prompts(1, seed=30, lo=6, hi=7)[0]
    assert lm.generate([p], max_new_tokens=40, draft_len=4, proposals=2)[0].token_ids == hf_greedy(base, p, 40)


@pytest.mark.parametrize("K", [1, 4])
def test_prefill_keeps_only_the_logits_it_reads(K, monkeypatch):
    """Prefill asks the LM head for each prompt's last position and the P_0 slots only: t and the P_0 draft
    logits equal those of the full-logits forward (ragged batch)."""
    _, lm = converted("llama")
    prompts = random_prompts(5, seed=21, lo=2, hi=12)
    cfg = lm.decode_config(draft_len=K, proposals=1)
    state, t = steps.prefill(lm, prompts, K, cfg, None)
    head = lm.model.get_output_embeddings()
    monkeypatch.setattr(head, "lora_A", {}, raising=False)  # what a LoRA'd LM head looks like: every row
    full_state, full_t = steps.prefill(lm, prompts, K, cfg, None)
    assert t == full_t
    assert torch.allclose(state.draft_logits, full_state.draft_logits, atol=1e-12)
    assert torch.equal(state.draft, full_state.draft)


class OnlyTheInterface:
    """The members of `DecodeModel` and nothing else, delegating to a DiffusionLM."""

    def __init__(self, lm):
        self.model, self.tokenizer, self.settings, self._lm = lm.model, lm.tokenizer, lm.settings, lm

    @property
    def mask_token_id(self):
        return self._lm.mask_token_id

    @property
    def context_len(self):
        return self._lm.context_len

    def forward(self, *args, **kwargs):
        return self._lm.forward(*args, **kwargs)

    def base_weights(self):
        return self._lm.base_weights()

    def cost_table(self):
        return self._lm.cost_table()


def test_diffusion_lm_meets_the_decode_interface(drafter, converted_dirs):
    """DiffusionLM (built, and loaded from disk) has every member of DecodeModel; an object with those members
    alone decodes the same tokens: the engine needs nothing else of a model."""
    assert isinstance(drafter, DecodeModel)
    assert isinstance(DiffusionLM.from_pretrained(converted_dirs["llama"]), DecodeModel)
    assert not isinstance(object(), DecodeModel)
    only = OnlyTheInterface(drafter)
    assert isinstance(only, DecodeModel)
    prompts = [drafter.pattern[:3], drafter.pattern[2:7]]
    for settings in ({"ar": True}, {"draft_len": 4, "proposals": 2}, {"draft_len": 8, "proposals": 3, "adaptive": True},
                     {"sampler": "lossless", "temperature": 0.8, "seed": 3, "stop": ("xx",)}):
        cfg = drafter.decode_config(max_new_tokens=16, **settings)
        want = engine.generate(drafter, prompts, cfg)
        got = engine.generate(only, prompts, cfg)
        assert [g.token_ids for g in got] == [g.token_ids for g in want], settings
        assert [g.stats.forwards for g in got] == [g.stats.forwards for g in want], settings


def drafting_end_to_end(base, tmp_path, n_data: int = 48, steps: int = 80, n_prompts: int = 6, accepted_min: int = 20):
    """`distill` the base's own continuations of random prompts, `train` the drafting adapter on them (through the
    CLI), load the result: greedy equals the base's HF generate at K = 4, |R| in {1, 3}, and the trained drafts
    are accepted (the accept branches run). Returns the trained model."""
    import json

    import yaml
    from conftest import distill_random_prompts
    from transformers import AutoModelForCausalLM

    from ar2dlm.cli import main

    base.save_pretrained(tmp_path / "base")
    make_tokenizer().save_pretrained(tmp_path / "base")
    data = distill_random_prompts(tmp_path / "base", tmp_path, n_data)
    recipe = {"run_dir": str(tmp_path / "run"), "model": {"path": str(tmp_path / "base"), "precision": "fp32"},
              "data": {"train": [str(data)], "seq_len": 48, "heldout_fraction": 0.1},
              "objective": {"block_size": 4}, "adapter": {"kind": "drafting", "rank": 8, "alpha": 16},
              "optim": {"lr": 1e-2, "mask_row_lr": 1e-2, "batch_size": 8},
              "schedule": {"max_steps": steps, "warmup_fraction": 0.0},
              "eval": {"every_steps": 0, "log_every": 10}, "checkpoint": {"every_steps": 1000, "every_minutes": 0}}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["train", "--config", str(tmp_path / "recipe.yaml")]) == 0
    lm = DiffusionLM.from_pretrained(tmp_path / "run" / "final")
    assert lm.settings.adapter == "drafting"
    ref = AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
    prompts = [json.loads(line)["prompt_ids"] for line in data.read_text().splitlines()][:n_prompts]
    accepted = 0
    for p in prompts + random_prompts(2, seed=4):
        want = hf_greedy(ref, p, 24)
        for K, R in [(4, 1), (4, 3)]:
            got = lm.generate([p], max_new_tokens=24, draft_len=K, proposals=R)[0]
            assert got.token_ids == want, (p, K, R)
            accepted += sum(n * c for n, c in got.stats.accepted.items() if n > 1)
    assert accepted > accepted_min  # the trained drafts were accepted: the accept branches ran
    return lm
