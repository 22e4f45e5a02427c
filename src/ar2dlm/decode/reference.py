"""Naive, cache-free decoders: the oracles the engine is tested against.

Every step recomputes the whole sequence from scratch with a mask built by
plain loops, and verification is a Python loop over the draft. Slow and
obviously right; never used outside tests.
"""

from __future__ import annotations

import torch

from .interface import DecodeModel


def _forward(lm: DecodeModel, ids: list[int], pos: list[int], allowed: list[list[bool]],
             slots: list[bool]) -> torch.Tensor:
    mask = torch.tensor(allowed, dtype=torch.bool)[None]
    logits = lm.forward(torch.tensor([ids]), torch.tensor([pos]), mask, torch.tensor([slots]))
    return logits[0]


def _argmax(logits: torch.Tensor, mask_token_id) -> int:
    logits = logits.clone()
    if mask_token_id is not None and mask_token_id < logits.shape[-1]:
        logits[mask_token_id] = float("-inf")
    return int(logits.argmax())


def ar_greedy(lm: DecodeModel, prompt: list[int], max_new_tokens: int, eos: set[int] = frozenset()) -> list[int]:
    """Greedy AR decoding, one full causal forward per token."""
    seq, out = list(prompt), []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            n = len(seq)
            causal = [[j <= i for j in range(n)] for i in range(n)]
            logits = _forward(lm, seq, list(range(n)), causal, [False] * n)
            tok = _argmax(logits[-1], lm.mask_token_id)
            seq.append(tok)
            out.append(tok)
            if tok in eos:
                break
    return out


def lookup(seq: list[int], k: int, exclude: int | None = None, ngrams=(3, 2)) -> list[int]:
    """The tokens that followed the latest earlier occurrence of seq's longest tail n-gram (a plain scan)."""
    for n in ngrams:
        for s in range(len(seq) - n - 1, -1, -1):
            if n <= len(seq) - 1 and seq[s:s + n] == seq[len(seq) - n:]:
                out = seq[s + n:s + n + k]
                return out[:out.index(exclude)] if exclude in out else out
    return []


def _with_lookup(draft: list[int], real: int, seq: list[int], exclude) -> tuple[list[int], int, bool]:
    """The draft with d_2.. replaced by the tail's continuation where there is one: (draft, real drafts, found)."""
    found = lookup(seq, len(draft) - 1, exclude)
    return draft[:1] + found + draft[1 + len(found):], max(real, 1 + len(found)), bool(found)


def tidar_greedy(lm: DecodeModel, prompt: list[int], max_new_tokens: int, draft_len: int,
                 eos: set[int] = frozenset(), candidates: str = "both") -> tuple[list[int], int]:
    """Greedy TiDAR decoding with every proposal (R = {1..K}); returns (tokens, forward passes).

    Each step: [committed prefix (causal) | d_1..d_K | P_1 .. P_K], where P_r
    is K mask slots at positions L+r.. seeing the prefix and d_1..d_r. With
    candidates "both", a draft's d_2.. are the continuation of the tail's latest
    earlier occurrence (3-gram, else 2-gram) where there is one, and a step whose
    draft is such a continuation has no slots: the next draft is [t] and what the
    text continues with.
    """
    suffix = candidates == "both" and draft_len > 1
    copying = False
    K, M = draft_len, lm.mask_token_id
    committed, out, forwards = list(prompt), [], 0
    with torch.no_grad():
        # prefill: prompt | P_0
        L = len(committed)
        ids = committed + [M] * K
        pos = list(range(L)) + list(range(L, L + K))
        allowed = [[(j <= i if i < L else True) if j < L else (i >= L) for j in range(L + K)] for i in range(L + K)]
        logits = _forward(lm, ids, pos, allowed, [i >= L for i in range(L + K)])
        forwards += 1
        t = _argmax(logits[L - 1], M)
        draft = [t] + [_argmax(logits[L + j], M) for j in range(1, K)]
        real = K
        out.append(t)
        if suffix:
            draft, real, copying = _with_lookup(draft, real, list(prompt) + out, M)
        while len(out) < max_new_tokens and not eos.intersection(out):
            L = len(committed)
            P = 0 if copying else K  # proposals P_1..P_K, none while the text repeats
            ids = committed + draft + [M] * (K * P)
            pos = list(range(L)) + [L + j for j in range(K)] + [L + r + s for r in range(1, P + 1) for s in range(K)]
            n = len(ids)

            def sees(i, j):
                if j < L:
                    return i >= L or j <= i  # everyone sees the committed prefix (causally within it)
                if i < L:
                    return False
                if i < L + K:  # draft row: causal over the draft
                    return L <= j <= i
                r, jr = (i - L - K) // K + 1, (j - L - K) // K + 1
                if j < L + K:  # proposal P_r sees d_1..d_r
                    return j - L < r
                return r == jr  # own block only

            allowed = [[sees(i, j) for j in range(n)] for i in range(n)]
            logits = _forward(lm, ids, pos, allowed, [i >= L + K for i in range(n)])
            forwards += 1
            target = [_argmax(logits[L + j], M) for j in range(K)]  # target[j-1] = argmax p_j
            r = 1
            while r < real and draft[r] == target[r - 1]:
                r += 1
            t = target[r - 1]
            committed += draft[:r]
            out += draft[1:r] + [t]
            if P:
                base = L + K + (r - 1) * K  # first row of P_r
                draft, real = [t] + [_argmax(logits[base + s], M) for s in range(1, K)], K
            else:
                draft, real = [t] + [0] * (K - 1), 1  # nothing drafted: padding, never accepted
            if suffix:
                draft, real, copying = _with_lookup(draft, real, list(prompt) + out, M)
    out = out[:max_new_tokens]
    for i, tok in enumerate(out):
        if tok in eos:
            return out[:i + 1], forwards
    return out, forwards
