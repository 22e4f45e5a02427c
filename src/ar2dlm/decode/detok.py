"""Incremental detokenization: one request's text as its tokens are committed, in time linear in its length.

Decoding the whole output after every token (to stream it, or to look for a stop string) costs O(n) per
token, O(n^2) per request. As vLLM does, we decode a short window of the latest ids instead:

    ids    t1 t2 t3 | t4 t5 | t6          committed ids (special tokens dropped, as skip_special_tokens does)
                      ^prefix ^read
    new text = decode([t4 t5 t6])[len(decode([t4 t5])):]

t4 t5 are context only: a decoder that looks at its neighbours (SentencePiece drops the space at the start
of a text; byte-level BPE joins bytes into characters) sees the same left context in both decodes, so the
difference is the text t6 adds to the full decode. While that text ends in U+FFFD the last character is
incomplete (its UTF-8 bytes are split over tokens): the text stays pending and the window grows until the
character completes; then the text is confirmed and the offsets move on (prefix <- read <- end). The window
holds ~3 ids (more only while a character is incomplete: at most its 4 bytes in UTF-8 text; a run of invalid
bytes grows it), so every committed id passes through decode a bounded number of times.

This relies on decode being prefix-stable: more ids only append to the text of a complete prefix. Byte-level
BPE (GPT-2, Llama 3, Qwen, SmolLM) is. SentencePiece with byte fallback (Llama 2, Mistral) is wherever the
output ends on a whole character: decode turns a run of <0xXX> tokens that is not (yet) UTF-8 into one U+FFFD
per token, characters earlier in the run included, while the window keeps the characters it had confirmed (as
vLLM does); the two agree again once the run is whole characters, and differ for good only on invalid bytes.
WordPiece's clean-up ("do n ' t" -> "don't", BERT) is not prefix-stable. tokenizers' DecodeStream runs the
same window in Rust, but hides the pending text that the stop check (and the full decode) sees.

Stop strings are looked for only where a new match can be: the new text and the last (longest stop - 1)
confirmed characters before it. The reference is `cut_stop(tokenizer.decode(ids, skip_special_tokens=True),
stop)`, the full decode of the ids taken; tests/test_detok.py holds this module to it.
"""

from __future__ import annotations

REPLACEMENT = "\ufffd"
"""What a decoder shows for bytes that are not (yet) a whole UTF-8 character."""


def cut_stop(text: str, stops) -> str:
    """`text` up to the earliest occurrence of any stop string (all of it if none occurs)."""
    cut = min((text.find(s) for s in stops if s in text), default=-1)
    return text if cut < 0 else text[:cut]


def hold_back(text: str, stops) -> str:
    """Text safe to show while decoding goes on: without a tail that could begin a stop string."""
    for n in range(min(len(text), max((len(s) for s in stops), default=1) - 1), 0, -1):
        if any(s.startswith(text[-n:]) for s in stops):
            return text[:-n]
    return text


class Detokenizer:
    """The text of one request's committed tokens, built incrementally.

        det = Detokenizer(tokenizer, stop=("\\n\\n",))
        taken = det.add(new_ids)   # how many of new_ids were taken (fewer only if a stop string completed)
        show(det.delta())          # text that is safe to show now
        det.finish()               # no more tokens (EOS, length): delta() releases everything left
        det.text                   # == cut_stop(tokenizer.decode(ids_taken, skip_special_tokens=True), stop)

    `tokenizer` is any Hugging Face tokenizer (only its `decode` is used).
    """

    def __init__(self, tokenizer, stop: tuple[str, ...] = ()):
        if not all(isinstance(s, str) and s for s in stop):
            raise ValueError(f"stop strings must be non-empty strings, got {stop!r}")
        self.tokenizer, self.stop = tokenizer, tuple(stop)
        self.stopped = False  # a stop string completed: the last id taken completed it
        self._done = False  # stopped or finish()ed: add() takes nothing more
        self._keep = max(map(len, self.stop), default=1) - 1  # a new stop match starts at most this far back
        self._skip: dict[int, bool] = {}  # id -> whether skip_special_tokens drops it
        self._window: list[int] = []  # the ids from the prefix offset on
        self._read = 0  # window[:read] is context whose text is confirmed already
        self._context = ""  # decode(window[:read])
        self._confirmed: list[str] = []  # the confirmed text, in pieces
        self._length = 0  # its length
        self._tail = ""  # its last `_keep` characters
        self._pending = ""  # the text of window[read:] while its last character is incomplete
        self._unshown: list[str] = []  # confirmed text not yet returned by delta()
        self._shown = 0  # characters returned by delta()
        self._final: str | None = None  # the whole text, once done

    def add(self, token_ids: list[int]) -> int:
        """Append committed ids one by one; return how many were taken. Taking stops after the id that
        completes a stop string (it is the last one taken); once stopped or finished nothing is taken."""
        taken = 0
        for tok in token_ids:
            if self._done:
                break
            taken += 1
            if not self._skipped(tok):
                self._push(tok)
        return taken

    def finish(self) -> None:
        """No more tokens: the pending text (an incomplete last character) joins the text, as decode shows it."""
        if not self._done:
            self._final, self._done = "".join(self._confirmed) + self._pending, True

    @property
    def text(self) -> str:
        """The text so far, cut at the earliest stop string. Joins its pieces (O(length)): read it once at
        the end; stream with delta()."""
        return self._final if self._final is not None else "".join(self._confirmed) + self._pending

    def delta(self) -> str:
        """The text safe to show since the last call: confirmed text without a tail that could begin a stop
        string; once stopped or finished, everything not shown yet. All deltas joined are `text`."""
        if self._done:
            out = self._final[self._shown:]
        else:
            unshown = "".join(self._unshown)
            out = hold_back(unshown, self.stop) if self.stop else unshown
            self._unshown = [unshown[len(out):]]
        self._shown += len(out)
        return out

    # ------------------------------------------------------------------------ the window
    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _skipped(self, tok: int) -> bool:
        """Whether decode drops `tok` (a special token). Dropping it here keeps the window on ids with text,
        so a run of special tokens does not grow it."""
        if tok not in self._skip:
            decode = self.tokenizer.decode
            self._skip[tok] = decode([tok], skip_special_tokens=True) == "" and decode([tok]) != ""
        return self._skip[tok]

    def _push(self, tok: int) -> None:
        self._window.append(tok)
        text = self._decode(self._window)
        new = text[len(self._context):]  # the text of window[read:]: what the new id (and pending ones) add
        before, start = self._tail, self._length - len(self._tail)
        if new and not new.endswith(REPLACEMENT):
            self._confirm(new)
        else:
            self._pending = new  # an incomplete character (or no text yet): wait for the next id
        if self.stop and new:
            hits = [i for i in map((before + new).find, self.stop) if i >= 0]
            if hits:  # full text so far = confirmed + pending; cut it at the earliest match
                self._final = ("".join(self._confirmed) + self._pending)[:start + min(hits)]
                self.stopped = self._done = True

    def _confirm(self, new: str) -> None:
        """`new` is final: add it to the text and slide the window (prefix <- read <- end)."""
        self._confirmed.append(new)
        self._unshown.append(new)
        self._length += len(new)
        tail = self._tail + new
        self._tail = tail[len(tail) - min(self._keep, len(tail)):]
        self._pending = ""
        self._window = self._window[self._read:]
        self._read = len(self._window)
        self._context = self._decode(self._window)
