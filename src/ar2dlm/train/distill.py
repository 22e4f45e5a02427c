"""Self-distillation: the model's own AR continuations of prompts, as training data.

The drafter learns to predict what the AR head will say next, which is
exactly what verification accepts; so the cheapest good data is the AR
model's own greedy (or sampled) output. Output is JSONL, one record per
prompt, with the token ids themselves (no re-tokenisation drift):

    {"id": ..., "source": ..., "prompt_ids": [...], "completion_ids": [...], "text": ...}

Runs are resumable: records already in the output file are skipped.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from tqdm import tqdm

from ..core import files
from ..core.errors import ConfigError
from ..core.files import read_text
from ..decode.engine import generate
from ..model.lm import DiffusionLM
from .config import DistillConfig
from .data import read_prompt_file


def distill(lm: DiffusionLM, prompts_file: str | Path, out_dir: str | Path,
            cfg: DistillConfig = DistillConfig()) -> Path:
    """Write `out_dir/distilled.jsonl` with the AR continuation of every prompt (resumable)."""
    out_dir = files.check_path(out_dir, "out_dir")
    out = out_dir / "distilled.jsonl"
    # it grows in place (no force): never an input, inside the model or the prompts file itself
    files.check_not_input(out, [prompts_file, lm.source], "distilled file", replaces=False)
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"output folder {out_dir} is a file, not a directory", field="out")
    limit, max_new_tokens, batch_size = cfg.limit, cfg.max_new_tokens, cfg.batch_size
    records = read_prompt_file(prompts_file)[:limit]
    done = read_done(out) if out.exists() else set()
    out_dir.mkdir(parents=True, exist_ok=True)
    todo = [r for r in records if r["id"] not in done]
    print(f"distill: {len(records)} prompts, {len(done)} done, {len(todo)} to go -> {out}", file=sys.stderr)
    # similar lengths together: less padding in a batch
    todo.sort(key=lambda r: len(r["prompt"]))
    decoding = lm.decode_config(**cfg.decoding())
    bar = tqdm(total=len(todo), desc="distill", unit="prompt", dynamic_ncols=True)
    new_tokens, start_time = 0, time.perf_counter()
    with out.open("a") as f:
        for start in range(0, len(todo), batch_size):
            chunk = todo[start:start + batch_size]
            ids = [lm.encode([r["prompt"]], chat=r["chat"])[0] for r in chunk]
            ctx = lm.context_len or 10**9
            ids = [p[-(ctx - max_new_tokens):] for p in ids]
            for r, p, g in zip(chunk, ids, generate(lm, ids, decoding)):
                f.write(json.dumps({"id": r["id"], "source": r["source"], "chat": r["chat"], "prompt_ids": p,
                                    "completion_ids": g.token_ids, "text": g.text}) + "\n")
                new_tokens += len(g.token_ids)
            f.flush()
            bar.update(len(chunk))
            bar.set_postfix(tok_per_s=f"{new_tokens / (time.perf_counter() - start_time):.0f}")
    bar.close()
    return out


def read_done(out: Path) -> set:
    """The ids of the records already in `out`, which the run appends to.

    A last line without its newline is a record cut by an interruption: it
    is dropped (that prompt is redone), or ended if it is whole. Any other line that is not a record is
    named with its line number and nothing is appended.
    """
    text = read_text(out, "distilled file")
    lines = text.split("\n")
    partial = lines.pop() if lines else ""  # "" when the file ends with a newline
    done = set()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            record, reason = None, f"not JSON ({e.msg})"
        else:
            reason = "not a distilled record (a JSON object with id, prompt_ids and completion_ids)"
        if not (isinstance(record, dict) and {"id", "prompt_ids", "completion_ids"} <= record.keys()):
            raise ConfigError(f"distilled file {out} line {number} is {reason}; distill appends to it: fix or delete "
                              f"that line, or choose another output folder")
        done.add(record["id"])
    if partial:
        try:
            record = json.loads(partial)
        except json.JSONDecodeError:
            record = None
        if isinstance(record, dict) and {"id", "prompt_ids", "completion_ids"} <= record.keys():
            done.add(record["id"])  # complete but for its newline
            with out.open("a") as f:
                f.write("\n")
        else:
            _drop_partial_last_line(out)
    return done


def _drop_partial_last_line(path: Path) -> None:
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        path.write_bytes(data[:data.rfind(b"\n") + 1])

