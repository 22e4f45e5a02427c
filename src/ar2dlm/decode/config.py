"""`DecodeConfig`: one request's decoding settings (the `generate` flags map 1:1 onto its fields)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..core.validation import check, check_types, finite

SAMPLERS = ("greedy", "lossless", "mix")
CANDIDATES = ("both", "diffusion", "suffix")
MAX_DRAFT_LEN = 64
MAX_SIBLINGS = 16
"""Most siblings per depth of a candidate tree (each is one more row of every step)."""
"""The longest block / draft: a step feeds K (1 + |R|) rows, so longer drafts only cost."""
MIN_TEMPERATURE = 1e-3
"""Smaller temperatures overflow the scaled logits; 0 means greedy (argmax)."""
SEED_RANGE = (0, 2**64 - 1)


@dataclass(frozen=True)
class DecodeConfig:
    """One request's decoding settings. The CLI flags have the same names."""

    max_new_tokens: int = 128
    """Stop after this many new tokens."""
    draft_len: int = 16
    """K: tokens per draft, 1..64 (1 = no drafting, plain AR steps)."""
    proposals: int = 3
    """|R|: proposals pre-drafted per forward, 1..draft_len (full TiDAR: draft_len)."""
    sampler: str = field(default="greedy", metadata={"choices": SAMPLERS})
    """greedy (== AR greedy) | lossless (speculative sampling, == AR distribution) | mix (logit mixing)."""
    mix_weight: float = 0.0
    """w of the mix sampler: verify against softmax((1-w) AR + w diffusion logits); 0 = lossless."""
    temperature: float = 1.0
    """Softmax temperature for lossless / mix (0 = greedy; the greedy sampler takes no other value)."""
    top_k: int = 0
    """Keep the k most likely tokens (0 = off; lossless / mix only)."""
    top_p: float = 1.0
    """Keep the smallest set with cumulative probability >= top_p (1 = off; lossless / mix only)."""
    seed: int | None = None
    """Seed of the sampling generator, 0..2**64-1 (None = nondeterministic; greedy draws nothing)."""
    stop: tuple[str, ...] = ()
    """Stop strings: generation ends when the text contains one (it is cut from `text`)."""
    eos_token_id: tuple[int, ...] | None = None
    """End-of-sequence ids (None = the model's generation config; () = never stop on EOS)."""
    ar: bool = False
    """Plain autoregressive decoding on the same model and cache (one token per forward)."""
    candidates: str = field(default="both", metadata={"choices": CANDIDATES})
    """Where drafts come from: diffusion (the model's slots) | suffix (continuations of the tail found earlier in
    the prompt or output; no slot rows after the first step) | both (a found continuation, else diffusion).
    The mix sampler drafts from diffusion only."""
    tree: tuple[int, ...] = ()
    """Candidate trees: tree[j-1] more candidates for the draft's guess at depth j (its first guess is depth 1),
    each one more row of every step, verified in the same forward (decode/tree.py). E.g. 3 = the drafter's next
    3 most likely first tokens beside its first guess; 3,1 adds one more for the second. () = one chain."""
    adaptive: bool = False
    """Adaptive drafting: per step, the draft length (up to draft_len, down to plain AR steps) with the best
    expected tokens per unit of forward cost, from the acceptance seen so far."""

    def __post_init__(self):
        check_types(self)
        check(self.max_new_tokens >= 1, f"max_new_tokens must be >= 1, got {self.max_new_tokens}", "max_new_tokens")
        check(1 <= self.draft_len <= MAX_DRAFT_LEN, f"draft_len must be in 1..{MAX_DRAFT_LEN}, got {self.draft_len}",
              "draft_len")
        check(1 <= self.proposals <= self.draft_len,
              f"proposals must be in 1..draft_len ({self.draft_len}), got {self.proposals}", "proposals")
        check(self.candidates in CANDIDATES,
              f"candidates must be one of {', '.join(CANDIDATES)}, got {self.candidates!r}", "candidates")
        check(self.sampler in SAMPLERS, f"sampler must be one of {', '.join(SAMPLERS)}, got {self.sampler!r}",
              "sampler")
        check(0.0 <= self.mix_weight <= 1.0, f"mix_weight must be in [0, 1], got {self.mix_weight}", "mix_weight")
        check(self.temperature == 0.0 or (MIN_TEMPERATURE <= self.temperature and finite(self.temperature)),
              f"temperature must be 0 (greedy) or a finite number >= {MIN_TEMPERATURE:g}, got {self.temperature}",
              "temperature")
        check(self.top_k >= 0, f"top_k must be >= 0 (0 = off), got {self.top_k}", "top_k")
        check(0.0 < self.top_p <= 1.0, f"top_p must be in (0, 1], got {self.top_p}", "top_p")
        check(self.seed is None or SEED_RANGE[0] <= self.seed <= SEED_RANGE[1],
              f"seed must be in {SEED_RANGE[0]}..2**64-1, got {self.seed}", "seed")
        check(all(s for s in self.stop), "stop strings must be non-empty strings", "stop")
        # a setting the chosen decoding would ignore is refused, never dropped in silence
        check(self.mix_weight == 0.0 or (self.sampler == "mix" and not self.ar),
              f"mix_weight={self.mix_weight} only applies to sampler='mix' with drafting "
              f"(got sampler={self.sampler!r}{', ar=True' if self.ar else ''})", "mix_weight")
        if self.sampler == "greedy":
            ignored = [name for name, off in (("temperature", 1.0), ("top_k", 0), ("top_p", 1.0))
                       if getattr(self, name) != off and not (name == "temperature" and self.temperature == 0.0)]
            check(not ignored, f"{', '.join(f'{n}={getattr(self, n)}' for n in ignored)} only "
                               f"appl{'ies' if len(ignored) == 1 else 'y'} to sampler='lossless' or 'mix'; the "
                               f"greedy sampler takes the argmax", ignored[0] if ignored else None)
        check(all(0 <= m <= MAX_SIBLINGS for m in self.tree),
              f"tree must list 0..{MAX_SIBLINGS} siblings per depth, got {','.join(map(str, self.tree))}", "tree")
        check(len(self.tree) < self.draft_len or not any(self.tree[self.draft_len - 1:]),
              f"tree has siblings at depth {len(self.tree)}, but a draft of draft_len={self.draft_len} guesses "
              f"depths 1..{self.draft_len - 1}", "tree")
        check(not any(self.tree) or (not self.ar and self.candidates != "suffix"),
              f"tree={','.join(map(str, self.tree))} adds candidates beside the drafter's guesses; "
              f"{'ar=True' if self.ar else 'candidates=suffix'} has none", "tree")
        check(not (self.ar and self.adaptive), "adaptive=True chooses the draft length; ar=True decodes one token "
                                               "per forward without drafts: choose one", "adaptive")

    @property
    def greedy(self) -> bool:
        """Temperature 0 means argmax whatever the sampler; greedy is exact AR greedy."""
        return self.sampler == "greedy" or self.temperature == 0.0
