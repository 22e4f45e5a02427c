"""Every attention mask of ar2dlm, built as dense bool tensors (True = attend).

Queries are rows, keys are columns. `to_additive` turns a bool mask into the
additive float mask eager attention needs (sdpa takes either); `for_model`
picks the right one for a loaded model. Rows that would attend to nothing get
their own diagonal so that no softmax sees an all-masked row (NaN).

All masks carry a leading batch dimension: [b, q, k].
"""

from __future__ import annotations

import torch


def causal_mask(seq_len: int, batch: int = 1, device=None) -> torch.Tensor:
    """Plain causal mask [batch, S, S]: token i attends to tokens 0..i.

    S = 3:   1 . .
             1 1 .
             1 1 1
    """
    i = torch.arange(seq_len, device=device)
    return (i[None, :] <= i[:, None]).expand(batch, seq_len, seq_len).clone()


def block_ids(seq_len: int, block_size: int, block_offset: torch.Tensor | int = 0, device=None) -> torch.Tensor:
    """Block index of every position [b, S]; a nonzero offset makes block 0 shorter.

    block(i) = (i + offset) // B, offset in [0, B): with B = 3, offset 1 the
    blocks of positions 0..5 are 0 0 1 1 1 2.
    """
    offset = torch.as_tensor(block_offset, device=device).reshape(-1, 1)
    return (torch.arange(seq_len, device=device)[None, :] + offset) // block_size


def training_mask(
    seq_len: int,
    block_size: int,
    doc_ids: torch.Tensor | None = None,
    block_offset: torch.Tensor | int = 0,
    device=None,
) -> torch.Tensor:
    """TiDAR training layout over [clean x_0..x_{S-1} | slots m_0..m_{S-1}] -> [b, 2S, 2S].

    Clean rows are causal and never see slots. Slot m_i of block b sees the
    clean tokens of all earlier blocks and every slot of its own block.
    Nothing crosses a document boundary (`doc_ids` [b, S], same id = same doc).

    B = 3, S = 6:
                keys: c0 c1 c2 c3 c4 c5 | m0 m1 m2 m3 m4 m5
       c0             1  .  .  .  .  .  | .  .  .  .  .  .
       c1             1  1  .  .  .  .  | .  .  .  .  .  .
       c5             1  1  1  1  1  1  | .  .  .  .  .  .
       m0 m1 m2       .  .  .  .  .  .  | 1  1  1  .  .  .
       m3 m4 m5       1  1  1  .  .  .  | .  .  .  1  1  1
    """
    if doc_ids is None:
        doc_ids = torch.zeros(1, seq_len, dtype=torch.long, device=device)
    device = doc_ids.device
    S = seq_len
    block = block_ids(S, block_size, block_offset, device).expand(doc_ids.shape[0], S)  # [b, S]
    pos = torch.arange(S, device=device)
    block2 = torch.cat([block, block], 1)  # [b, 2S]
    doc2 = torch.cat([doc_ids, doc_ids], 1)  # [b, 2S]
    pos2 = torch.cat([pos, pos])  # [2S]
    slot2 = torch.arange(2 * S, device=device) >= S  # [2S]

    q_slot, k_slot = slot2[:, None], slot2[None, :]  # [2S, 1], [1, 2S]
    clean_clean = ~q_slot & ~k_slot & (pos2[None, :] <= pos2[:, None])  # [2S, 2S]
    slot_clean = q_slot & ~k_slot  # refined by blocks below
    slot_slot = q_slot & k_slot
    qb, kb = block2[:, :, None], block2[:, None, :]  # [b, 2S, 1], [b, 1, 2S]
    mask = clean_clean | (slot_clean & (kb < qb)) | (slot_slot & (kb == qb))  # [b, 2S, 2S]
    return mask & (doc2[:, :, None] == doc2[:, None, :])


def prefill_mask(prompt_lens: torch.Tensor, padded_len: int, draft_len: int) -> torch.Tensor:
    """Prefill layout [prompt (causal, right-padded) | P_0: K slots] -> [b, Lp+K, Lp+K].

    Row i's prompt occupies slots 0..len_i-1; slots len_i..Lp-1 are holes no
    one attends to (their own outputs are ignored). P_0 slots see the whole
    prompt and each other: they draft positions len_i..len_i+K-1.

    len = 2, Lp = 3, K = 2:   keys: p0 p1 h | s0 s1
                              p0     1  .  . | .  .
                              p1     1  1  . | .  .
                              h      1  1  . | .  .
                              s0     1  1  . | 1  1
                              s1     1  1  . | 1  1
    """
    device = prompt_lens.device
    b, Lp, K = prompt_lens.shape[0], padded_len, draft_len
    valid = torch.arange(Lp, device=device)[None, :] < prompt_lens[:, None]  # [b, Lp]
    n = Lp + K
    mask = torch.zeros(b, n, n, dtype=torch.bool, device=device)
    mask[:, :Lp, :Lp] = causal_mask(Lp, device=device) & valid[:, None, :]
    mask[:, Lp:, :Lp] = valid[:, None, :]
    mask[:, Lp:, Lp:] = True
    return _self_attend_empty_rows(mask, offset=0)


def step_mask(cache_valid: torch.Tensor, draft_len: int, proposals: torch.Tensor) -> torch.Tensor:
    """Decode step: [draft d_1..d_K | P_r for r in R] over [cache | step] -> [b, q, C+q].

    `cache_valid` [b, C]: which cache slots hold committed tokens (others are
    holes left by ragged acceptance in a batch). `proposals` [b, n]: the
    acceptance lengths r pre-drafted; P_r is K slots conditioned on d_1..d_r.
    q = K + n K.

    K = 3, R = {1, 2}:  keys -> cache | d1 d2 d3 | P1 slots | P2 slots
       d1                        1    | 1  .  .  |  . . .   |  . . .
       d2                        1    | 1  1  .  |  . . .   |  . . .
       d3                        1    | 1  1  1  |  . . .   |  . . .
       P1 slots                  1    | 1  .  .  |  1 1 1   |  . . .
       P2 slots                  1    | 1  1  .  |  . . .   |  1 1 1
    """
    device = cache_valid.device
    b, C = cache_valid.shape
    K, n = draft_len, proposals.shape[1]
    q = K + n * K
    mask = torch.zeros(b, q, C + q, dtype=torch.bool, device=device)
    mask[:, :, :C] = cache_valid[:, None, :]
    mask[:, :K, C:C + K] = causal_mask(K, device=device)
    # proposal block k: sees drafts d_1..d_{R_k} and its own K slots
    j = torch.arange(K, device=device)
    sees_draft = j[None, None, :] < proposals[:, :, None]  # [b, n, K]
    mask[:, K:, C:C + K] = sees_draft.repeat_interleave(K, dim=1)
    block = torch.arange(n, device=device).repeat_interleave(K)  # [n K]
    mask[:, K:, C + K:] = block[:, None] == block[None, :]
    return mask


def windowed(mask: torch.Tensor, query_pos: torch.Tensor, key_pos: torch.Tensor, window: int,
             key_slot: torch.Tensor) -> torch.Tensor:
    """A sliding-window layer's mask: `mask` [b, q, k] without the keys `window` or more positions back.

    A row at position p reads a key at position p' only if p - p' < window,
    as transformers' sliding layers do (`sliding_window_overlay`: the window
    holds the W tokens ending at the row's own). Clean rows are thus causal
    within the window. A slot row reads its logical predecessors (the tokens
    before its block) within the window, measured from its own position, plus
    its whole block: slot keys (`key_slot`) are never cut, and a layout only
    ever shows a slot row the slots of its own block. The one definition for
    every layout (training, prefill, decode step), so training and decoding
    see the same layer.

    query_pos [b, q], key_pos [b, k] (the cached keys' positions, then the
    rows'), key_slot bool [b, k].

    Training layout (`training_mask`), B = 3, S = 6, window W = 3:
                keys: c0 c1 c2 c3 c4 c5 | m0 m1 m2 m3 m4 m5
       c0             1  .  .  .  .  .  | .  .  .  .  .  .
       c1             1  1  .  .  .  .  | .  .  .  .  .  .
       c2             1  1  1  .  .  .  | .  .  .  .  .  .
       c3             .  1  1  1  .  .  | .  .  .  .  .  .
       c4             .  .  1  1  1  .  | .  .  .  .  .  .
       c5             .  .  .  1  1  1  | .  .  .  .  .  .
       m0 m1 m2       .  .  .  .  .  .  | 1  1  1  .  .  .
       m3             .  1  1  .  .  .  | .  .  .  1  1  1
       m4             .  .  1  .  .  .  | .  .  .  1  1  1
       m5             .  .  .  .  .  .  | .  .  .  1  1  1

    Decode step (`step_mask`), committed tokens at positions 0..3, K = 3,
    R = {1}, W = 3 (d_j at position 3 + j, P_1 slot s at 4 + s):
       keys ->   cache 0 1 2 3 | d1 d2 d3 | P1 slots
       d1 (4)          . . 1 1 | 1  .  .  |  . . .
       d2 (5)          . . . 1 | 1  1  .  |  . . .
       d3 (6)          . . . . | 1  1  1  |  . . .
       P1 s1 (5)       . . . 1 | 1  .  .  |  1 1 1
       P1 s2 (6)       . . . . | 1  .  .  |  1 1 1
       P1 s3 (7)       . . . . | .  .  .  |  1 1 1
    """
    near = query_pos[:, :, None] - key_pos[:, None, :] < window  # [b, q, k]
    out = mask & (near | key_slot[:, None, :])
    # a padding row (a shorter prompt's hole, which reads that prompt) may keep no key in its window: it reads its
    # own, the forward's rows being the last q keys, so no softmax sees an empty row (NaN in its K/V poisons others)
    q, k = mask.shape[-2:]
    rows = torch.arange(q, device=mask.device)
    out[:, rows, rows + k - q] |= ~out.any(-1)
    return out


def key_positions(mask: torch.Tensor, query_pos: torch.Tensor, cached: int) -> torch.Tensor:
    """Positions [b, cached + q] of a forward's keys: its cached keys' (derived from `mask`), then its rows'.

    ar2dlm's caches hold each batch row's committed tokens in position order
    from 0, and a layout's clean rows read every one of them (holes, never
    read, are padding and tokens another batch row kept): a cached key's
    position is the number of read cache keys before it. So `mask` [b, q,
    cached + q] must be the layout before any window is applied.
    """
    seen = mask[:, :, :cached].any(1)  # [b, cached]
    return torch.cat([seen.long().cumsum(1) - 1, query_pos], 1)


def to_additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Bool mask [b, q, k] -> additive float mask [b, 1, q, k] (0 = attend, finfo.min = not).

    finfo.min rather than -inf: eager softmax of an all -inf row is NaN.
    """
    out = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
    out.masked_fill_(~mask, torch.finfo(dtype).min)
    return out[:, None]


def for_model(mask: torch.Tensor | dict[str, torch.Tensor], model) -> torch.Tensor | dict[str, torch.Tensor]:
    """The 4D mask a stock HF forward takes as-is: bool for sdpa, additive float otherwise (a dict of them, one
    per layer kind, for a model whose layers see different windows)."""
    if isinstance(mask, dict):
        return {kind: for_model(m, model) for kind, m in mask.items()}
    impl = getattr(model.config, "_attn_implementation", "eager")
    if impl in ("sdpa", "ar2dlm_sdpa"):  # attention.NAME: sdpa over packed GQA rows
        return mask[:, None]
    return to_additive(mask, model.dtype)


def _self_attend_empty_rows(mask: torch.Tensor, offset: int) -> torch.Tensor:
    """Give rows with no visible key their own diagonal (padding holes) to avoid NaN."""
    empty = ~mask.any(-1)  # [b, q]
    if empty.any():
        q = mask.shape[1]
        diag = torch.zeros_like(mask)
        idx = torch.arange(q, device=mask.device)
        diag[:, idx, idx + offset] = True
        mask = mask | (diag & empty[:, :, None])
    return mask


def tree_mask(cache_valid: torch.Tensor, draft_len: int, depths: torch.Tensor, proposals: torch.Tensor) -> torch.Tensor:
    """Decode step with candidate siblings: [draft d_1..d_K | siblings | P_r for r in R] -> [b, q, C+q].

    A sibling at depth j is another candidate for position L+j (where d_{j+1} sits): it sees the cache,
    d_1..d_j (its ancestors) and itself, so its row is the AR row of that token had the drafts before it been
    accepted. `depths` [S]: each sibling's j (1..K-1). Drafts and proposals see what they see in `step_mask`;
    no one else sees a sibling. q = K + S + n K.

    K = 3, depths = (1, 1, 2), R = {1}:
                  keys -> cache | d1 d2 d3 | a  b  c | P1 slots
       d1                  1    | 1  .  .  | .  .  . |  . . .
       d2                  1    | 1  1  .  | .  .  . |  . . .
       d3                  1    | 1  1  1  | .  .  . |  . . .
       a (for d2)          1    | 1  .  .  | 1  .  . |  . . .
       b (for d2)          1    | 1  .  .  | .  1  . |  . . .
       c (for d3)          1    | 1  1  .  | .  .  1 |  . . .
       P1 slots            1    | 1  .  .  | .  .  . |  1 1 1
    """
    device = cache_valid.device
    b, C = cache_valid.shape
    K, S = draft_len, depths.shape[0]
    chain = step_mask(cache_valid, K, proposals)  # [b, K + nK, C + K + nK]
    q = chain.shape[1] + S
    mask = torch.zeros(b, q, C + q, dtype=torch.bool, device=device)
    # the chain and the proposals as in step_mask, with the sibling columns (and rows) left between them
    mask[:, :K, :C + K] = chain[:, :K, :C + K]
    mask[:, K + S:, :C + K] = chain[:, K:, :C + K]
    mask[:, K + S:, C + K + S:] = chain[:, K:, C + K:]
    sees = torch.arange(K, device=device)[None, :] < depths[:, None]  # [S, K]: d_1..d_j
    mask[:, K:K + S, :C] = cache_valid[:, None, :]
    mask[:, K:K + S, C:C + K] = sees
    mask[:, K:K + S, C + K:C + K + S] = torch.eye(S, dtype=torch.bool, device=device)
    return mask
