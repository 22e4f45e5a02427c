"""Sliding-window attention (gpt-oss, Gemma 3, OLMo 3, Mistral with a window) through the decode engine, held to HF
generate: each layer kind reads its own window (`nn/masks.windowed`), the cache keeps every key, so greedy decoding
equals AR greedy past the window's edge, alone and in ragged batches."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import EOS, VOCAB, make_tokenizer, train_drafter
from test_decode import drafting_end_to_end, hf_greedy, random_prompts
from transformers import (
    AutoModelForCausalLM,
    Cohere2Config,
    Exaone4Config,
    Gemma2Config,
    Gemma3TextConfig,
    GptOssConfig,
    MinistralConfig,
    MistralConfig,
    Olmo3Config,
    Qwen2Config,
    Qwen3Config,
)

from ar2dlm.model.architectures import attention_windows, check_architecture
from ar2dlm.model.convert import add_mask_token
from ar2dlm.model.lm import DiffusionLM
from ar2dlm.model.settings import DiffusionConfig
from ar2dlm.nn import masks
from ar2dlm.train import objective

WINDOW = 5
MIXED = ["sliding_attention", "full_attention", "sliding_attention"]


def _c(vocab, layers=3):
    return dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, eos_token_id=EOS,
                bos_token_id=None, pad_token_id=0, sliding_window=WINDOW)


FAMILIES = {  # family -> tiny config (vocab), every one with layers that see only the last WINDOW positions
    "gpt_oss": lambda V: GptOssConfig(**_c(V), head_dim=8, num_local_experts=4, num_experts_per_tok=2,
                                      layer_types=MIXED),
    "gemma3_text": lambda V: Gemma3TextConfig(**_c(V), head_dim=8, layer_types=MIXED),
    "olmo3": lambda V: Olmo3Config(**_c(V), layer_types=MIXED),
    "mistral": lambda V: MistralConfig(**_c(V, layers=2)),  # every layer sliding: one mask for all
}
MORE = {  # families of the same kinds, held to HF generate by one test (gemma2: eager attention, no sinks)
    "gemma2": lambda V: Gemma2Config(**_c(V), head_dim=8, layer_types=MIXED),
    "cohere2": lambda V: Cohere2Config(**_c(V), layer_types=MIXED),
    "exaone4": lambda V: Exaone4Config(**_c(V), layer_types=MIXED),
    "ministral": lambda V: MinistralConfig(**_c(V), head_dim=8, layer_types=MIXED),
    "qwen2": lambda V: Qwen2Config(**_c(V), use_sliding_window=True, layer_types=MIXED),
    "qwen3": lambda V: Qwen3Config(**_c(V), head_dim=8, use_sliding_window=True, layer_types=MIXED),
}
SETTINGS = [(2, 1), (4, 1), (4, 3), (8, 1), (8, 3)]  # (K, |R|)
NEW = 24


def tiny(family, seed=0, vocab=VOCAB, dtype=torch.float64, sharpen=8.0):
    torch.manual_seed(seed)
    config = {**FAMILIES, **MORE}[family](vocab)
    model = AutoModelForCausalLM.from_config(config, experts_implementation="eager")
    model = model.to(dtype).eval()
    with torch.no_grad():  # random init is near-uniform; sharper logits make drafts and ties realistic
        model.get_output_embeddings().weight.mul_(sharpen)
    model.generation_config.eos_token_id = EOS
    model.generation_config.pad_token_id = 0
    return model


def converted(family, **kw):
    base = tiny(family, **kw)
    model = copy.deepcopy(base)
    tok = make_tokenizer(base.config.vocab_size)
    mask_id = add_mask_token(model, tok)
    return base, DiffusionLM(model, tok, DiffusionConfig(block_size=4, mask_token_id=mask_id))


def prompts_around_the_window(n=12, seed=1):
    """Prompts that end inside the window, on its edge, one past it and well across it (the 24 new tokens take
    every context past the window)."""
    edge = [WINDOW - 1, WINDOW, WINDOW + 1, 2 * WINDOW + 3]
    g = torch.Generator().manual_seed(seed)
    fixed = [torch.randint(2, VOCAB, (m,), generator=g).tolist() for m in edge]
    return fixed + random_prompts(n - len(fixed), seed=seed, hi=3 * WINDOW)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_sliding_greedy_equals_hf_generate(family):
    base, lm = converted(family)
    prompts = prompts_around_the_window()
    expected = [hf_greedy(base, p) for p in prompts]
    assert [g.token_ids for p in prompts for g in lm.generate([p], max_new_tokens=NEW, ar=True)] == expected
    for K, R in SETTINGS:
        alone = [lm.generate([p], max_new_tokens=NEW, draft_len=K, proposals=R)[0].token_ids for p in prompts]
        assert alone == expected, (K, R)
        batched = []
        for i in range(0, len(prompts), 4):  # ragged batches of 4
            batched += [g.token_ids for g in lm.generate(prompts[i:i + 4], max_new_tokens=NEW, draft_len=K,
                                                         proposals=R)]
        assert batched == expected, (K, R)


@pytest.mark.parametrize("family", sorted(MORE))
def test_more_windowed_families_decode_exactly(family):
    """Other families with sliding layers beside full ones: accepted, and greedy == HF generate past the window,
    alone and in ragged batches (their padding rows, left with no key in a window, read their own)."""
    check_architecture(MORE[family](VOCAB))
    base, lm = converted(family)
    assert lm.windows == {"sliding_attention": WINDOW, "full_attention": None}
    prompts = prompts_around_the_window(8)
    expected = [hf_greedy(base, p) for p in prompts]
    for K, R in [(2, 1), (4, 3)]:
        alone = [lm.generate([p], max_new_tokens=NEW, draft_len=K, proposals=R)[0].token_ids for p in prompts]
        assert alone == expected, (K, R)
        assert [g.token_ids for i in range(0, 8, 4)
                for g in lm.generate(prompts[i:i + 4], max_new_tokens=NEW, draft_len=K, proposals=R)] == expected


@pytest.mark.parametrize("family", ["gemma3_text", "mistral"])
def test_the_window_is_exactly_the_models(family):
    """The oracle sees the window: full attention, or a window one position longer or shorter, decodes otherwise
    (so the equality above holds the window's edge: a key `window` positions back is not read)."""
    base, lm = converted(family)
    prompts = prompts_around_the_window()
    expected = [hf_greedy(base, p) for p in prompts]
    exact = dict(lm.windows)
    for windows in ({}, {k: w and w + 1 for k, w in exact.items()}, {k: w and w - 1 for k, w in exact.items()}):
        lm.windows = windows
        got = [lm.generate([p], max_new_tokens=NEW, draft_len=4, proposals=3)[0].token_ids for p in prompts]
        assert got != expected, windows
    lm.windows = exact


def test_windows_per_layer_kind():
    assert attention_windows(FAMILIES["gemma3_text"](VOCAB)) == {"sliding_attention": WINDOW, "full_attention": None}
    assert attention_windows(FAMILIES["mistral"](VOCAB)) == {"sliding_attention": WINDOW}
    long = MistralConfig(**{**_c(VOCAB), "sliding_window": 256})  # as long as the context: full attention
    assert attention_windows(long) == {"sliding_attention": None}
    for family in FAMILIES:
        check_architecture(FAMILIES[family](VOCAB))  # no error


def test_layer_masks_draw_the_window():
    """A decode step's masks (`masks.windowed`, the docstring's drawing): cached keys' positions from the layout,
    slot rows keep their block."""
    _, lm = converted("gemma3_text")
    K, R = 3, torch.tensor([[1]])
    layout = masks.step_mask(torch.ones(1, 4, dtype=torch.bool), K, R)  # cache 0..3, d1..d3, P_1
    pos = torch.tensor([[4, 5, 6, 5, 6, 7]])
    slots = torch.tensor([[False] * 3 + [True] * 3])
    lm.windows = {"sliding_attention": 3, "full_attention": None}
    got = lm.layer_masks(layout, pos, slots)
    assert got["full_attention"] is layout
    drawn = ["0011 100 000", "0001 110 000", "0000 111 000", "0001 100 111", "0000 100 111", "0000 000 111"]
    want = torch.tensor([[c == "1" for c in r.replace(" ", "")] for r in drawn])
    assert torch.equal(got["sliding_attention"][0], want)
    holes = torch.tensor([[True, False, True, False, True, True]])  # a ragged batch's holes: the same positions
    layout = masks.step_mask(holes, K, R)
    got = lm.layer_masks(layout, pos, slots)["sliding_attention"][0]
    cache = got[:, :6]
    assert torch.equal(cache[:, holes[0]], want[:, :4]) and not cache[:, ~holes[0]].any()
    assert torch.equal(got[:, 6:], want[:, 4:])


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("offset", [0, 3])
def test_sliding_doubled_loss_equals_naive(family, offset):
    """The doubled sequence with each layer's window == one forward per block, the same windows."""
    _, lm = converted(family)
    x = torch.randint(2, VOCAB, (2, 17), generator=torch.Generator().manual_seed(0))
    batch = objective.build_batch(x, lm.settings, block_offset=offset, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = objective.loss(lm, batch)
        want = objective.naive_loss(lm, batch, 4, offset)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, torch.as_tensor(b, dtype=a.dtype))


@pytest.fixture(scope="module")
def drafter():
    """An olmo3 trained (all weights, AR + diffusion loss) on a repeating pattern, so drafts are accepted."""
    return train_drafter(model=tiny("olmo3"), steps=80)


def test_sliding_trained_drafter_greedy_equals_hf(drafter):
    """Drafts are accepted, so every accept branch runs past the window."""
    lm = drafter
    pattern = lm.pattern
    prompts = [(pattern * 3)[i:i + 4 + i % 5] for i in range(8)] + random_prompts(4, seed=3)
    suppress = [lm.mask_token_id]
    expected = [hf_greedy(lm.model, p, 30, suppress) for p in prompts]
    accepted = 0
    for K, R in [(4, 1), (4, 3), (8, 3)]:
        gens = [lm.generate([p], max_new_tokens=30, draft_len=K, proposals=R)[0] for p in prompts]
        assert [g.token_ids for g in gens] == expected, (K, R)
        accepted += sum(n * c for g in gens for n, c in g.stats.accepted.items() if n > 1)
        batched = [g.token_ids for i in range(0, len(prompts), 4)
                   for g in lm.generate(prompts[i:i + 4], max_new_tokens=30, draft_len=K, proposals=R)]
        assert batched == expected, (K, R)
    assert accepted > 50  # drafts were accepted: the accept branches ran


def test_sliding_reference_decoders_agree_with_engine(drafter):
    """The naive decoders recompute everything with no cache (keys' positions given); the engine's cached steps
    draw the same windows from its cache, so it drafts the same tokens, step for step."""
    from ar2dlm.decode.reference import ar_greedy, tidar_greedy

    for p in [drafter.pattern[:3], drafter.pattern[2:9]] + random_prompts(2, seed=3):
        ar = ar_greedy(drafter, p, 20, {EOS})
        for K in (2, 4):
            toks, forwards = tidar_greedy(drafter, p, 20, K, {EOS})
            g = drafter.generate([p], max_new_tokens=20, draft_len=K, proposals=K)[0]
            assert toks == ar and g.token_ids == toks
            assert g.stats.forwards == forwards


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_sliding_lossless_matches_ar_distribution(family):
    """Speculative sampling on a tiny-vocabulary windowed model: the first 3 sampled tokens after a prompt longer
    than the window follow AR's exact joint."""
    from test_lossless import assert_lossless

    base, lm = converted(family, vocab=8, sharpen=0.25)
    prompt = [3, 5, 2, 6, 4, 7, 3]  # longer than the window: the sampled tokens read only its end
    assert_lossless(base, lm, 10000, prompt)


def test_sliding_converts_and_decodes_from_disk(tmp_path):
    """gpt-oss (no sdpa attention: it loads with eager) converts, and its checkpoint decodes in fp32 through the
    CLI path's loader like HF generate."""
    from ar2dlm import convert

    base = tiny("gpt_oss", dtype=torch.float32)
    base.save_pretrained(tmp_path / "base")
    make_tokenizer().save_pretrained(tmp_path / "base")
    out = convert(tmp_path / "base", tmp_path / "out", block_size=4)
    lm = DiffusionLM.from_pretrained(out)
    assert lm.model.config._attn_implementation == "eager" and lm.model.dtype == torch.float32
    prompts = prompts_around_the_window(6, seed=5)
    got = [g.token_ids for g in lm.generate(prompts, max_new_tokens=16, draft_len=4, proposals=3)]
    want = [hf_greedy(lm.model, p, 16, [lm.mask_token_id]) for p in prompts]
    assert got == want


def test_sliding_drafting_loss_equals_doubled_and_naive():
    """The gated adapter's loss runs the clean half into a cache, then the slots over it: with packed documents
    and selected slots it equals the doubled forward's and the per-block one, the windows measured from the
    clean tokens' positions."""
    from test_zaya import with_drafting_adapter

    from ar2dlm.train.trainer import drafting_loss

    _, lm = converted("gemma3_text")
    with_drafting_adapter(lm)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(2, VOCAB, (2, 22), generator=g)
    docs = torch.tensor([[0] * 9 + [1] * 13, [0] * 22])
    loss_mask = torch.ones(2, 22, dtype=torch.bool)
    loss_mask[:, :8] = False  # prompt tokens: select drops the blocks without targets
    batch = objective.build_batch(x, lm.settings, doc_ids=docs, loss_mask=loss_mask, block_offset=torch.tensor([1, 2]),
                                  generator=g)
    with torch.no_grad():
        selected, _, idx = drafting_loss(lm, batch, select=True)
        every, _, _ = drafting_loss(lm, batch, select=False)
        _, _, doubled = objective.loss(lm, batch)
        single = objective.build_batch(x[1:], lm.settings, block_offset=2, generator=torch.Generator().manual_seed(3))
        one, _, _ = drafting_loss(lm, single)
        _, _, naive = objective.naive_loss(lm, single, 4, 2)
    assert idx.shape[1] < 22
    torch.testing.assert_close(selected, every)
    torch.testing.assert_close(every, doubled.to(every.dtype))
    torch.testing.assert_close(one, torch.as_tensor(naive, dtype=one.dtype), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("family", ["gemma3_text", "gpt_oss"])
def test_sliding_distill_train_drafting_adapter_end_to_end(family, tmp_path):
    """`ar2dlm distill`, then `ar2dlm train` with the gated drafting adapter, on a windowed checkpoint (rows of 48
    tokens, a window of 5), then decoding from its output: greedy equals the base model's HF generate, and the
    trained drafts get accepted."""
    lm = drafting_end_to_end(tiny(family, dtype=torch.float32), tmp_path)
    assert lm.windows


@pytest.mark.parametrize("family", ["gemma3_text", "olmo3", "mistral"])
def test_exactness_check_covers_windowed_layers(family):
    """The machine check (model/exactness.py) runs its verify and slot steps through each layer kind's window (at
    contexts past it) in bf16: every part, attention included, is bitwise row-invariant. (gpt-oss's attention has
    sinks and runs transformers' eager attention: the check compares its whole forward, not its attention.)"""
    from ar2dlm.model import exactness

    model = tiny(family, dtype=torch.bfloat16)
    tok = make_tokenizer()
    lm = DiffusionLM(model, tok, DiffusionConfig(block_size=4, mask_token_id=add_mask_token(model, tok)),
                     batch_invariant=True)
    lm.fuse()
    verdict = exactness.check(lm, contexts=(30, 100))
    assert verdict.exact and verdict.components["attention"] is True, verdict.line()


def test_sliding_rows_joining_and_leaving_decode_as_alone():
    """Continuous batching (decode/core.Batch): a newcomer's cache is merged with holes, rows leave; each row's
    windows are measured from its own committed tokens, so it decodes as alone."""
    from test_serve_batching import assert_joined_rows_decode_as_alone

    _, lm = converted("gemma3_text")
    assert_joined_rows_decode_as_alone(lm, prompts_around_the_window(6, seed=7))
