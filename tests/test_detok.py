"""Detokenizer (decode/detok.py) against its oracle, the full decode of the ids taken cut at the earliest stop
string: `cut_stop(tokenizer.decode(ids, skip_special_tokens=True), stop)`. Tokenizers are built here, offline:
byte-level BPE (GPT-2 style), SentencePiece BPE with byte fallback (Llama style), the suite's word-level one,
and ByT5's (a Python, "slow" tokenizer that drops incomplete characters instead of showing U+FFFD)."""

from __future__ import annotations

import json
import random

import pytest
from conftest import make_tokenizer
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import ByT5Tokenizer, LlamaTokenizer, PreTrainedTokenizerFast

from ar2dlm.decode.detok import REPLACEMENT, Detokenizer, cut_stop, hold_back

CORPUS = ["The quick brown fox jumps over the lazy dog.", "Hello, world! Stop here: STOP.",
          "日本語のテキストと中文文本。", "emoji 🙂🚀👍🏽 and 🇫🇷 flags", "naïve café résumé, “quotes” — and 'n't'"] * 20
"""Trains the tokenizers below: characters and merges it lacks (most emoji, CJK) become byte tokens."""
TEXTS = ["emoji 🙂🚀👍🏽 and 🇫🇷 flags 中文 ✨", "日本語 and Ελληνικά, 한국어 😀😃😄",
         "The quick brown fox 🦊 jumps. STOP."]


def byte_level():
    """GPT-2 style: byte-level BPE; characters outside its merges are split into byte tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                        show_progress=False))
    out = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    out.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
    return out


def sentencepiece():
    """Llama style: Metaspace BPE whose rare characters fall back to <0xXX> byte tokens; decode strips the
    leading space of the text."""
    sp = Tokenizer(models.BPE(unk_token="<unk>"))
    sp.pre_tokenizer = pre_tokenizers.Metaspace()
    sp.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=200, limit_alphabet=40, show_progress=False))
    trained = json.loads(sp.to_str())["model"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for piece in trained["vocab"]:
        vocab.setdefault(piece, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in trained["merges"]]
    return LlamaTokenizer(vocab=vocab, merges=merges)


WORDS = ["w5 w7 w9 w11", "w2 w3 w5 w7 w11 w13 w17 w19 w23", "w40 w41 w40 w41 w42 w95"]


class Case:
    """A tokenizer, texts to encode, and how to draw random ids for it."""

    def __init__(self, tok, texts=TEXTS, byte_fallback=False):
        self.tok, self.texts, self.byte_fallback = tok, texts, byte_fallback
        if byte_fallback:  # pieces, special tokens, and characters spelled in <0xXX> byte tokens
            vocab = tok.get_vocab()
            pieces = [[i] for p, i in vocab.items() if not p.startswith("<")] + [[i] for i in specials(tok)]
            self.units = pieces + [[vocab[f"<0x{b:02X}>"] for b in c.encode()] for c in "Héü中語😀🦊ΩЖ한\n"] * 20

    def random_ids(self, rng: random.Random, n: int) -> list[int]:
        """n random ids; with byte fallback, runs of byte tokens are whole characters (see
        test_byte_fallback_of_broken_bytes for what an invalid run does)."""
        if not self.byte_fallback:
            return [rng.randrange(len(self.tok)) for _ in range(n)]
        ids = []
        while len(ids) < n:
            ids += rng.choice(self.units)
        return ids


CASES = {"byte_level": lambda: Case(byte_level()),
         "sentencepiece": lambda: Case(sentencepiece(), byte_fallback=True),
         "word_level": lambda: Case(make_tokenizer(), texts=WORDS),
         "byt5": lambda: Case(ByT5Tokenizer())}


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
    return CASES[request.param]()


def decode(tok, ids):
    return tok.decode(ids, skip_special_tokens=True)


def encode(tok, text):
    return tok.encode(text, add_special_tokens=False)


def first_stop(tok, ids, stop) -> int:
    """The oracle's stop: the first k after which the full decode of ids[:k] contains a stop string."""
    for k in range(1, len(ids) + 1):
        if cut_stop(decode(tok, ids[:k]), stop) != decode(tok, ids[:k]):
            return k
    return len(ids)


def run(tok, ids, stop=(), seed=0, byte_fallback=False):
    """Feed ids in commits of 1..4 (as the engine commits them), holding every state to the oracle.
    Returns (ids taken, all deltas joined, the detokenizer).

    With byte fallback, a run of byte tokens that does not end on a whole character decodes to one U+FFFD
    per byte token, the characters before it in the run included; the window shows those as they are. The
    text is held to the oracle whenever the output ends on a whole character."""
    rng, det = random.Random(seed), Detokenizer(tok, stop)
    taken, shown = 0, ""
    while taken < len(ids) and not det.stopped:
        commit = ids[taken:taken + rng.randint(1, 4)]
        n = det.add(commit)
        assert n == len(commit) or (det.stopped and 1 <= n < len(commit))
        taken += n
        full = decode(tok, ids[:taken])
        if not (byte_fallback and full.endswith(REPLACEMENT)):
            assert det.text == cut_stop(full, stop)
        shown += det.delta()
        if not det.stopped:  # never shown: a tail that could begin a stop string
            assert hold_back(det.text, stop).startswith(shown)
    if det.stopped:  # the id that completed a stop string was the last one taken
        assert det.add(ids[taken:taken + 1]) == 0
    det.finish()
    shown += det.delta()
    assert det.add([ids[0]]) == 0 and det.delta() == ""
    return taken, shown, det


def specials(tok) -> list[int]:
    return [i for i in tok.all_special_ids if decode(tok, [i]) == ""]


def test_random_ids(case):
    """Random ids: broken UTF-8 (U+FFFD in the middle, characters split over ids), special tokens anywhere."""
    for seed in range(8):
        rng = random.Random(seed)
        ids = case.random_ids(rng, rng.randint(1, 80))
        taken, shown, det = run(case.tok, ids, seed=seed, byte_fallback=case.byte_fallback)
        assert taken == len(ids) and not det.stopped
        assert shown == det.text == decode(case.tok, ids)


def test_multibyte_text_and_special_tokens(case):
    """Emoji and CJK whose bytes are split over several ids, with special tokens interleaved (also between
    the bytes of one character)."""
    for seed, text in enumerate(case.texts):
        rng, ids = random.Random(seed), encode(case.tok, text)
        for _ in range(len(ids) // 3):
            ids.insert(rng.randrange(len(ids) + 1), rng.choice(specials(case.tok)))
        taken, shown, det = run(case.tok, ids, seed=seed, byte_fallback=case.byte_fallback)
        assert shown == det.text == decode(case.tok, ids) and taken == len(ids)


@pytest.mark.parametrize("source", ["text", "random"])
def test_stop_strings(case, source):
    """Stop strings cut from the text itself (so they span ids and do occur), several at once, one that never
    occurs: the detokenizer stops at the oracle's token and its text and deltas are the oracle's."""
    stopped = 0
    for seed in range(12):
        rng = random.Random(seed)
        ids = encode(case.tok, case.texts[seed % 3]) if source == "text" else case.random_ids(rng, 60)
        full = decode(case.tok, ids)
        if not full:
            continue
        stop = ["\x00never"]
        for _ in range(rng.randint(1, 3)):
            start = rng.randrange(len(full))
            stop.append(full[start:start + rng.randint(1, 6)])
        taken, shown, det = run(case.tok, ids, tuple(stop), seed=seed, byte_fallback=case.byte_fallback)
        assert taken == first_stop(case.tok, ids, stop)
        assert shown == det.text == cut_stop(decode(case.tok, ids[:taken]), stop)
        stopped += det.stopped
    assert stopped >= 6


def test_byte_fallback_of_broken_bytes():
    """Where the window and the full decode part ways: a byte token run that is not UTF-8 ("\\n" then the first
    byte of an emoji) decodes to one U+FFFD per byte token, the newline included; the window had confirmed the
    newline already and keeps it (as vLLM does). Only text with invalid or unfinished bytes differs."""
    tok = sentencepiece()
    vocab = tok.get_vocab()
    ids = [vocab["<0x0A>"], vocab["<0xF0>"]] + encode(tok, "Hello")
    det = Detokenizer(tok)
    det.add(ids)
    det.finish()
    assert decode(tok, ids) == REPLACEMENT * 2 + " Hello" and det.text == "\n" + REPLACEMENT + " Hello"


def test_stop_across_tokens_is_held_back():
    """Word-level ids 5 7 9 decode to "w5 w7 w9". With stop "5 w7", "5" could begin it and is not shown; the
    id that completes the stop string is the last one taken."""
    det = Detokenizer(make_tokenizer(), stop=("5 w7",))
    assert det.add([5]) == 1 and det.delta() == "w"
    assert det.add([7, 9]) == 1 and det.stopped
    assert det.text == "w" and det.delta() == ""
    det = Detokenizer(make_tokenizer(), stop=("5 w7",))
    assert det.add([5, 8]) == 2 and det.delta() == "w5 w8"


def test_empty_stop_string_is_refused():
    with pytest.raises(ValueError, match="non-empty"):
        Detokenizer(make_tokenizer(), stop=("x", ""))


class Counting:
    """A tokenizer whose decode counts the ids and characters it has decoded."""

    def __init__(self, tok):
        self.tok, self.ids, self.chars = tok, 0, 0

    def decode(self, ids, **kw):
        self.ids += len(ids)
        text = self.tok.decode(ids, **kw)
        self.chars += len(text)
        return text


def test_work_is_linear():
    """4,000 committed ids (with special tokens and 3 stop strings that never match) cost a bounded number of
    decoded ids per id, and twice the ids cost twice the work, not four times."""
    tok = byte_level()
    rng = random.Random(0)
    text = " ".join(rng.choice(CORPUS + TEXTS) for _ in range(2000))
    ids = encode(tok, text)
    assert len(ids) >= 8000
    for i in range(0, len(ids), 7):
        ids[i] = tok.eos_token_id
    stop = ("<never>", "zzz", "🙃🙃")
    work = {}
    for n in (4000, 8000):
        counting = Counting(tok)
        det = Detokenizer(counting, stop)
        for i in range(0, n, 3):
            det.add(ids[i:min(i + 3, n)])
            det.delta()
        det.finish()
        assert not det.stopped and len(det.text) > n // 2
        work[n] = counting
        assert counting.ids <= 10 * n
    assert work[8000].ids <= 2.2 * work[4000].ids
    assert work[8000].chars <= 2.2 * work[4000].chars


def test_smollm2_tokenizer():
    """The bundled model's real tokenizer (byte-level BPE, 49k ids), if its checkpoint is cached already."""
    from transformers import AutoTokenizer

    from ar2dlm.model.bundled import BUNDLED, ar2dlm_home

    path = ar2dlm_home() / BUNDLED["smollm2-135m"]["cache_subdir"]
    if not (path / "tokenizer.json").exists():
        pytest.skip("the bundled SmolLM2 checkpoint is not cached")
    tok = AutoTokenizer.from_pretrained(path)
    for seed, text in enumerate(TEXTS):
        rng = random.Random(seed)
        ids = encode(tok, text + "<|im_end|>") + [rng.randrange(len(tok)) for _ in range(30)]
        taken, shown, det = run(tok, ids, seed=seed)
        assert shown == det.text == decode(tok, ids)
        stop = ("🦊", "中", "Ελ")
        taken, shown, det = run(tok, ids, stop, seed=seed)
        assert taken == first_stop(tok, ids, stop) and shown == det.text == cut_stop(decode(tok, ids[:taken]), stop)
    assert REPLACEMENT not in decode(tok, encode(tok, TEXTS[0]))
