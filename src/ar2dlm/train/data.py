"""Training data: files -> documents -> token ids -> packed rows with document ids.

A document is one text file, one JSONL line / Parquet row / datasets row, one
chat conversation, or one distilled record (prompt + the AR model's
continuation). Documents are tokenized with the model's tokenizer (EOS
appended) and packed into rows of `seq_len` tokens; `doc_ids` keep the
attention mask from crossing documents, `loss_mask` says which tokens are
targets (SFT: assistant tokens; distilled data: the continuation).
"""

from __future__ import annotations

import glob
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from ..core.errors import ConfigError
from ..core.files import open_text, read_text
from .config import DataSection

TEXT_SUFFIXES = {".txt", ".md", ".rst", ".py", ".text"}


@dataclass
class Document:
    ids: list[int]
    loss: list[bool]
    key: str  # where it came from (file, file:line), for the held-out split and errors


@dataclass
class Rows:
    """Packed rows: tokens, doc_ids (int) and loss_mask (bool), each [N, S]."""

    tokens: torch.Tensor
    doc_ids: torch.Tensor
    loss_mask: torch.Tensor

    def __len__(self) -> int:
        return self.tokens.shape[0]


# ---------------------------------------------------------------------------- reading
def expand_paths(patterns) -> list[Path]:
    """Files and folders named by patterns (globs allowed), in a stable order."""
    paths: list[Path] = []
    for pattern in patterns:
        matches = sorted(glob.glob(str(Path(pattern).expanduser()), recursive=True))
        if not matches:
            raise ConfigError(f"data: {pattern!r} matches no file or folder")
        paths += [Path(m) for m in matches]
    return paths


def detect_format(path: Path, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "state.json").exists() or \
                (path / "dataset_dict.json").exists():
            return "datasets"
        return "folder"
    if path.name.endswith("distilled.jsonl"):
        return "distilled"
    if path.suffix == ".jsonl" or path.name.endswith(".jsonl.gz"):
        return "jsonl"
    if path.suffix == ".parquet":
        return "parquet"
    if path.suffix in TEXT_SUFFIXES:
        return "text"
    raise ConfigError(f"data: cannot tell the format of {path}; set data.format (text, jsonl, parquet, datasets)")


def read_records(path: Path, fmt: str, section: DataSection) -> Iterator[tuple[str, object]]:
    """(key, record) pairs: record is a str (text), a list of messages (chat) or a dict (distilled)."""
    fmt = detect_format(path, fmt)
    if fmt == "folder":
        for f in sorted(p for p in path.rglob("*") if p.is_file()):
            if f.suffix in TEXT_SUFFIXES or f.suffix in (".jsonl", ".parquet"):
                yield from read_records(f, "auto", section)
        return
    if fmt == "text":
        yield str(path), read_text(path, "data: text file")
        return
    if fmt in ("jsonl", "distilled"):
        yield from _read_jsonl(path, fmt, section)
        return
    if fmt in ("parquet", "datasets"):
        for i, row in enumerate(_read_table(path, fmt)):
            yield f"{path}:{i}", _pick(row, section, f"{path} row {i}")
        return
    raise ConfigError(f"data: unknown format {fmt!r} for {path}")


def iter_jsonl(path: str | Path, label: str = "") -> Iterator[tuple[int, object]]:
    """(line number, value) of every non-blank line of a JSONL file (.gz too); a bad line is named."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{label}{path} does not exist")
    with open_text(path, f"{label}JSONL file".strip()) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield n, json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{label}{path}, line {n}: not valid JSON ({e.msg})") from e


def read_prompt_file(path: str | Path) -> list[dict]:
    """Prompts of a JSONL file, one per line: a JSON string, or {"prompt": text or token ids, "id"?, "chat"?,
    "source"?} -> [{"id", "prompt", "chat", "source"}]. A malformed line is named."""
    records = []
    for n, item in iter_jsonl(path, "prompts file "):
        row = item if isinstance(item, dict) else {"prompt": item}
        prompt = row.get("prompt")
        ok = isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt))
        if not ok:
            raise ConfigError(f"{path}, line {n}: expected a JSON string or an object with a \"prompt\" "
                              f"(text or a list of token ids)")
        records.append({"id": str(row.get("id", f"line-{n}")), "prompt": prompt, "chat": bool(row.get("chat", False)),
                        "source": row.get("source", "")})
    if not records:
        raise ConfigError(f"{path} holds no prompts")
    return records


def _read_jsonl(path: Path, fmt: str, section: DataSection):
    for n, row in iter_jsonl(path, "data: "):
        where = f"{path}, line {n}"
        if fmt == "distilled":
            ok = isinstance(row, dict) and isinstance(row.get("prompt_ids"), list) and \
                isinstance(row.get("completion_ids"), list)
            if not ok:
                raise ConfigError(f"data: {where}: a distilled record needs prompt_ids and completion_ids")
            yield f"{path}:{row.get('id', n)}", row
        else:
            yield f"{path}:{n}", _pick(row, section, where)


def _pick(row, section: DataSection, where: str):
    if not isinstance(row, dict):
        raise ConfigError(f"data: {where}: expected a JSON object")
    if section.chat:
        msgs = row.get("messages")
        ok = isinstance(msgs, list) and msgs and all(isinstance(m, dict) and "role" in m and "content" in m
                                                      for m in msgs)
        if not ok:
            raise ConfigError(f"data: {where}: expected \"messages\": a list of {{role, content}} (data.chat is on)")
        return msgs
    value = row.get(section.field)
    if not isinstance(value, str):
        raise ConfigError(f"data: {where}: field {section.field!r} missing or not a string "
                          f"(set data.field; present: {sorted(row)})")
    return value


def _read_table(path: Path, fmt: str):
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ConfigError("data: Parquet and datasets folders need pyarrow: pip install 'ar2dlm[data]'") from e
    if fmt == "parquet":
        try:
            table = pq.read_table(path)
        except Exception as e:  # pyarrow raises several types for corrupt files
            raise ConfigError(f"data: {path} is not a readable Parquet file ({e})") from e
        return table.to_pylist()
    try:
        from datasets import load_from_disk
    except ImportError as e:
        raise ConfigError("data: datasets folders need the datasets package: pip install 'ar2dlm[data]'") from e
    ds = load_from_disk(str(path))
    if hasattr(ds, "keys"):  # a DatasetDict: use its train split, or the first
        ds = ds["train"] if "train" in ds else ds[list(ds.keys())[0]]
    return iter(ds)


# ---------------------------------------------------------------------------- tokenizing
def tokenize(record, tokenizer, section: DataSection, key: str) -> Document:
    eos = tokenizer.eos_token_id
    if isinstance(record, dict):  # distilled: loss on the continuation only
        p, c = [int(t) for t in record["prompt_ids"]], [int(t) for t in record["completion_ids"]]
        return Document(p + c, [False] * len(p) + [True] * len(c), key)
    if isinstance(record, list):
        return _tokenize_chat(record, tokenizer, key)
    ids = tokenizer(record, add_special_tokens=False)["input_ids"]
    if eos is not None:
        ids = ids + [eos]
    return Document(ids, [True] * len(ids), key)


def _tokenize_chat(messages, tokenizer, key: str) -> Document:
    """Chat template; assistant turns are targets. Rendered turn by turn so the spans are exact."""
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError("data.chat needs a tokenizer with a chat template")
    ids, loss = [], []
    rendered = ""
    for i, m in enumerate(messages):
        upto = tokenizer.apply_chat_template(messages[:i + 1], tokenize=False)
        if m["role"] == "assistant":
            prompt = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
            head, body = prompt[len(rendered):], upto[len(prompt):]
        else:
            head, body = upto[len(rendered):], ""
        for text, target in ((head, False), (body, True)):
            if text:
                t = tokenizer(text, add_special_tokens=False)["input_ids"]
                ids += t
                loss += [target] * len(t)
        rendered = upto
    return Document(ids, loss, key)


# ---------------------------------------------------------------------------- packing
def pack(docs: list[Document], seq_len: int, pad_id: int = 0) -> Rows:
    """Pack documents into rows of seq_len without splitting one that fits in a row.

    A document that does not fit in the current row's free space starts a new
    row (the rest is padding); only a document longer than seq_len is split,
    into seq_len chunks. Splitting would cut a document from its context, and
    its tail would no longer be what the AR model saw.
    """
    rows: list[list[tuple[int, int, bool]]] = [[]]
    for d, doc in enumerate(docs):
        cells = [(t, d, l) for t, l in zip(doc.ids, doc.loss)]
        if len(cells) > seq_len - len(rows[-1]) and rows[-1]:
            rows.append([])
        while len(cells) > seq_len:
            rows[-1] += cells[:seq_len]
            rows.append([])
            cells = cells[seq_len:]
        rows[-1] += cells
    if not rows[-1]:
        rows.pop()
    pad = (pad_id, -1, False)  # padding is its own document, never a target
    rows = [r + [pad] * (seq_len - len(r)) for r in rows]
    tokens = torch.tensor([[c[0] for c in r] for r in rows], dtype=torch.long).view(-1, seq_len)
    doc_ids = torch.tensor([[c[1] for c in r] for r in rows], dtype=torch.long).view(-1, seq_len)
    loss = torch.tensor([[c[2] for c in r] for r in rows], dtype=torch.bool).view(-1, seq_len)
    return Rows(tokens, doc_ids, loss)


def is_heldout(key: str, fraction: float) -> bool:
    """Stable split by document key (independent of order and of other documents)."""
    h = int(hashlib.sha1(key.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return h < fraction


def load(section: DataSection, tokenizer) -> tuple[Rows, Rows]:
    """(train rows, held-out rows) for a data section."""
    if not section.train:
        raise ConfigError("data.train is empty: name files, folders or globs to train on")
    train, held = [], []
    heldout_sources = {str(p) for p in expand_paths(section.heldout)} if section.heldout else set()
    for path in expand_paths(section.train) + [Path(p) for p in sorted(heldout_sources)]:
        for key, record in read_records(path, section.format, section):
            doc = tokenize(record, tokenizer, section, key)
            if not doc.ids:
                continue
            in_heldout = str(path) in heldout_sources if heldout_sources else is_heldout(key, section.heldout_fraction)
            (held if in_heldout else train).append(doc)
            if section.max_docs and len(train) >= section.max_docs:
                break
    if not train:
        raise ConfigError("data: no training documents found")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return pack(train, section.seq_len, pad), pack(held, section.seq_len, pad) if held else \
        Rows(*(torch.zeros(0, section.seq_len, dtype=t) for t in (torch.long, torch.long, torch.bool)))
