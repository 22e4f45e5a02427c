"""Masks against their definitions, written out element by element."""

from __future__ import annotations

import torch

from ar2dlm.nn import masks


def drawn(rows: list[str]) -> torch.Tensor:
    return torch.tensor([[c == "1" for c in r.replace(" ", "")] for r in rows])


def test_training_mask_matches_the_drawing():
    # B = 3, S = 6, as drawn in docs/DESIGN.md §2 and the docstring
    expected = drawn([
        "100000 000000", "110000 000000", "111000 000000", "111100 000000", "111110 000000", "111111 000000",
        "000000 111000", "000000 111000", "000000 111000",
        "111000 000111", "111000 000111", "111000 000111",
    ])
    assert torch.equal(masks.training_mask(6, 3)[0], expected)


def test_training_mask_definition_with_offset_and_documents():
    S, B = 11, 4
    doc = torch.tensor([[0] * 5 + [1] * 6, [0] * 11])
    offset = torch.tensor([3, 1])
    m = masks.training_mask(S, B, doc, offset)
    for row in range(2):
        blk = [(i + int(offset[row])) // B for i in range(S)]
        for qi in range(2 * S):
            for ki in range(2 * S):
                qs, ks, qp, kp = qi >= S, ki >= S, qi % S, ki % S
                if not qs:
                    want = not ks and kp <= qp
                elif not ks:
                    want = blk[kp] < blk[qp]
                else:
                    want = blk[kp] == blk[qp]
                want = want and bool(doc[row, qp] == doc[row, kp])
                assert bool(m[row, qi, ki]) == want, (row, qi, ki)


def test_no_token_attends_across_a_document_boundary():
    S = 12
    doc = torch.tensor([[0] * 4 + [1] * 5 + [2] * 3])
    m = masks.training_mask(S, 4, doc)[0]
    d2 = torch.cat([doc[0], doc[0]])
    assert not (m & (d2[:, None] != d2[None, :])).any()
    assert m.any(-1).all()  # every row still sees something (itself at least)


def test_prefill_mask_definition():
    lens = torch.tensor([2, 4])
    Lp, K = 4, 3
    m = masks.prefill_mask(lens, Lp, K)
    for row in range(2):
        n = int(lens[row])
        for q in range(Lp + K):
            for k in range(Lp + K):
                if q < Lp:
                    want = k <= q and k < n  # no row sees a hole; hole rows' outputs are ignored
                else:
                    want = k < n or k >= Lp
                assert bool(m[row, q, k]) == want


def test_step_mask_definition():
    valid = torch.tensor([[1, 1, 0, 1], [1, 1, 1, 1]], dtype=torch.bool)
    K = 3
    R = torch.tensor([[1, 3], [2, 3]])
    m = masks.step_mask(valid, K, R)
    C = 4
    for row in range(2):
        for q in range(K + 2 * K):
            for k in range(C + K + 2 * K):
                if k < C:
                    want = bool(valid[row, k])
                elif q < K:
                    want = C <= k <= C + q
                elif k < C + K:
                    want = k - C < int(R[row, (q - K) // K])
                else:
                    want = (k - C - K) // K == (q - K) // K
                assert bool(m[row, q, k]) == want, (row, q, k)


def test_additive_mask_and_eager_equal_sdpa():
    from conftest import ARCHS
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    sd = AutoModelForCausalLM.from_config(ARCHS["llama"](96), attn_implementation="sdpa").double().eval()
    eager = AutoModelForCausalLM.from_config(ARCHS["llama"](96), attn_implementation="eager").double().eval()
    eager.load_state_dict(sd.state_dict())
    m = masks.training_mask(8, 4)
    add = masks.to_additive(m, torch.float64)
    assert add.shape == (1, 1, 16, 16) and (add[0, 0][m[0]] == 0).all() and (add[0, 0][~m[0]] < -1e300).all()
    ids = torch.randint(2, 96, (1, 16))
    pos = torch.cat([torch.arange(8), torch.arange(8)])[None]
    a = sd(input_ids=ids, position_ids=pos, attention_mask=masks.for_model(m, sd)).logits
    b = eager(input_ids=ids, position_ids=pos, attention_mask=masks.for_model(m, eager)).logits
    torch.testing.assert_close(a, b)
    assert not torch.isnan(b).any()


def test_windowed_leaves_no_row_without_a_key():
    """A prefill's padding rows read the shorter prompt: past its window they keep no key, and read their own
    (as `prefill_mask` gives rows that see nothing), never an empty row."""
    lens, Lp = torch.tensor([3, 9]), 9
    layout = masks.prefill_mask(lens, Lp, 0)
    pos = torch.arange(Lp).expand(2, Lp)
    m = masks.windowed(layout, pos, pos, 4, torch.zeros(2, Lp, dtype=torch.bool))
    assert m.any(-1).all()
    assert torch.equal(m[0, 6:], torch.eye(Lp, dtype=torch.bool)[6:])  # rows 6..8: prompt 0..2 out of the window
    assert torch.equal(m[1], layout[1] & (pos[1][:, None] - pos[1][None, :] < 4))
