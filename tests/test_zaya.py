"""ZAYA1 (CCA attention + MoE) through the decode engine, held to HF generate: the CCA convolutions and delayed
value read each row's logical predecessors (mixing.py), so greedy decoding equals AR greedy."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers as T
from transformers import AutoModelForCausalLM

from ar2dlm.config import DiffusionConfig
from ar2dlm.convert import add_mask_token
from ar2dlm.model import DiffusionLM
from conftest import EOS, VOCAB, make_tokenizer
from test_decode import N_PROMPTS, NEW, SETTINGS, hf_greedy, random_prompts

CONFIGS = {  # different conv kernels, heads and experts
    "cca2x2": dict(cca_time0=2, cca_time1=2, num_attention_heads=4, num_key_value_heads=2, num_experts=4),
    "cca3x2": dict(cca_time0=3, cca_time1=2, num_attention_heads=4, num_key_value_heads=1, num_experts=3),
}


def tiny_zaya(name, seed=0):
    torch.manual_seed(seed)
    c = T.ZayaConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, head_dim=16, moe_intermediate_size=32,
                     router_hidden_size=16, max_position_embeddings=256, eos_token_id=EOS, bos_token_id=None,
                     pad_token_id=0, **CONFIGS[name])
    model = AutoModelForCausalLM.from_config(c, attn_implementation="sdpa", experts_implementation="eager")
    model = model.double().eval()
    with torch.no_grad():  # sharper logits, and convolutions / delayed values that matter
        model.get_output_embeddings().weight.mul_(8.0)
        for n, p in model.named_parameters():
            if "conv" in n or "v_proj" in n:
                p.add_(0.3 * torch.randn_like(p))
    model.generation_config.eos_token_id = EOS
    model.generation_config.pad_token_id = 0
    return model


def converted(name):
    base = tiny_zaya(name)
    model = copy.deepcopy(base)
    tok = make_tokenizer()
    mask_id = add_mask_token(model, tok)
    return base, DiffusionLM(model, tok, DiffusionConfig(block_size=4, mask_token_id=mask_id))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_zaya_greedy_equals_hf_generate(name):
    base, lm = converted(name)
    prompts = random_prompts(N_PROMPTS, seed=1)
    expected = [hf_greedy(base, p) for p in prompts]
    assert [g.token_ids for p in prompts for g in lm.generate([p], max_new_tokens=NEW, ar=True)] == expected
    for K, R in SETTINGS:
        alone = [lm.generate([p], max_new_tokens=NEW, draft_len=K, proposals=R)[0].token_ids for p in prompts]
        assert alone == expected, (K, R)
        batched = []
        for i in range(0, N_PROMPTS, 4):  # ragged batches of 4
            batched += [g.token_ids for g in lm.generate(prompts[i:i + 4], max_new_tokens=NEW, draft_len=K,
                                                         proposals=R)]
        assert batched == expected, (K, R)
