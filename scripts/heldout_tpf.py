"""A drafter's estimated tokens per forward on distilled continuations it never trained on, by prompt source.

    python scripts/heldout_tpf.py smollm2-135m runs/data/distill-bench/distilled.jsonl
    python scripts/heldout_tpf.py runs/smollm2-135m-cpu-v2/final runs/data/distill-bench/distilled.jsonl

Each record (`ar2dlm distill` output: prompt_ids, completion_ids, source) is read in the training layout
([clean | mask slots], full masking) once per block alignment (offsets 0..B-1), so every completion token starts
a block once. A block fully inside the completion counts 1 (its first token is the AR's own) plus the leading
slots whose argmax is the distilled (greedy AR) token: greedy verification would accept exactly those. The mean
over blocks is the estimated TPF of greedy decoding with draft length B and every proposal (training's
`est_tpf`, over all alignments). The same number for two drafters on the same file is what `make drafter` ships on.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections import defaultdict

import torch

from ar2dlm.model.lm import DiffusionLM
from ar2dlm.train import objective
from ar2dlm.train.heldout import estimated_tpf


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="bundled name or checkpoint / adapter folder")
    parser.add_argument("data", help="distilled JSONL (ar2dlm distill) the drafter never trained on")
    parser.add_argument("--block-size", type=int, default=None, help="B (default: the model's block size)")
    parser.add_argument("--max-docs", type=int, default=0, help="only the first N records (0 = all)")
    parser.add_argument("--json", action="store_true", help="print one JSON line instead of a table")
    args = parser.parse_args(argv)
    lm = DiffusionLM.from_pretrained(args.model)
    B = args.block_size or lm.settings.block_size
    full = dataclasses.replace(lm.settings, masking="full", block_size=B)
    sums, counts = defaultdict(float), defaultdict(int)
    records = [json.loads(line) for line in open(args.data, encoding="utf-8") if line.strip()]
    records = records[:args.max_docs] if args.max_docs else records
    with torch.inference_mode():
        for n, r in enumerate(records, 1):
            ids = r["prompt_ids"] + r["completion_ids"]
            tokens = torch.tensor([ids])
            lmask = torch.tensor([[False] * len(r["prompt_ids"]) + [True] * len(r["completion_ids"])])
            docs = torch.zeros_like(tokens)
            for offset in range(B):
                batch = objective.build_batch(tokens, full, docs, lmask, offset)
                S = tokens.shape[1]
                logits = lm.forward(batch.input_ids, batch.position_ids, batch.attention_mask, batch.mask_slots)
                # a block of training's layout starts at (i + offset) % B == 0: shift so estimated_tpf's blocks
                # (from position 0) are the layout's
                shift = (B - offset) % B
                tpf, blocks = estimated_tpf(logits[:, S + shift:].float(), tokens[:, shift:], lmask[:, shift:],
                                            docs[:, shift:], B, lm.mask_token_id)
                if blocks:
                    for key in (r.get("source", "all"), "all"):
                        sums[key] += tpf * blocks
                        counts[key] += blocks
            if n % 20 == 0:
                print(f"{n}/{len(records)} records", file=sys.stderr, flush=True)
    result = {k: {"est_tpf": round(sums[k] / counts[k], 4), "blocks": counts[k]} for k in sorted(counts)}
    if args.json:
        print(json.dumps({"model": args.model, "data": args.data, "block_size": B, "by_source": result}))
    else:
        for k, v in result.items():
            print(f"{k:8} est. TPF {v['est_tpf']:.3f}  ({v['blocks']} blocks, B = {B})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
