"""Few-row inference linears (kernels.py): the transposed form equals F.linear, decoding with it equals HF
generate with the stock kernels, and it stays out of autograd and out of the user's random stream."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ar2dlm import kernels
from ar2dlm.config import DiffusionConfig
from ar2dlm.convert import add_mask_token
from ar2dlm.model import DiffusionLM
from conftest import EOS, make_tokenizer, tiny_model


@pytest.mark.parametrize("bias", [False, True])
def test_transposed_linear_equals_stock(forced_kernels, bias):
    torch.manual_seed(0)
    layer = torch.nn.Linear(48, 80, bias=bias)
    layer.forward = kernels.linear_forward.__get__(layer)
    with torch.inference_mode():
        for shape in [(1, 48), (1, 1, 48), (2, 3, 48), (5, 48), (1, 17, 48), (4, 8, 48), (1, 33, 48)]:
            x = torch.randn(shape)
            rows = x.numel() // 48
            assert bool(kernels.fast_rows(x, layer.weight)) == (rows <= kernels.MAX_ROWS)
            y = layer(x)
            assert y.shape == (*shape[:-1], 80) and y.is_contiguous()
            torch.testing.assert_close(y, F.linear(x, layer.weight, layer.bias))


def test_stock_outside_inference_and_when_switched_off(forced_kernels):
    w = torch.randn(8, 6, requires_grad=True)
    x = torch.randn(2, 6)
    assert kernels.fast_rows(x, w) == 0  # autograd records this product: F.linear
    with torch.no_grad():
        assert kernels.fast_rows(x, w) == 2
        assert kernels.fast_rows(x.double(), w.double()) == 0
        with kernels.stock():
            assert kernels.fast_rows(x, w) == 0
        assert kernels.fast_rows(x, w) == 2


def test_calibration_leaves_the_global_random_stream_alone(monkeypatch):
    monkeypatch.setattr(kernels, "_choice", {})
    torch.manual_seed(3)
    expected = torch.rand(4)
    torch.manual_seed(3)
    table = kernels.calibrate([torch.ones(16, 8)], reps=1)
    assert set(table) == {((16, 8), b) for b in kernels.BUCKETS}
    assert torch.equal(torch.rand(4), expected)


def test_greedy_decoding_with_transposed_kernels_equals_stock_hf_generate(forced_kernels):
    base = tiny_model("llama", 0, torch.float32)
    model = tiny_model("llama", 0, torch.float32)
    tok = make_tokenizer()
    lm = DiffusionLM(model, tok, DiffusionConfig(block_size=4, mask_token_id=add_mask_token(model, tok)))
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(2, 96, (int(n),), generator=g).tolist() for n in torch.randint(2, 14, (8,), generator=g)]
    with kernels.stock():
        expected = [base.generate(torch.tensor([p]), do_sample=False, max_new_tokens=20, eos_token_id=EOS,
                                  pad_token_id=0)[0, len(p):].tolist() for p in prompts]
    for K, R in [(1, 1), (4, 1), (4, 3), (8, 2)]:
        got = [lm.generate([p], max_new_tokens=20, draft_len=K, proposals=R)[0].token_ids for p in prompts]
        assert got == expected, (K, R)
