"""A drafting adapter with part of what it learned taken away: a copy to measure with heldout_tpf.py.

    python scripts/adapter_ablate.py src/ar2dlm/assets/smollm2-135m-drafter /tmp/r16 --rank 16
    python scripts/adapter_ablate.py src/ar2dlm/assets/smollm2-135m-drafter /tmp/mlp --drop attn
    python scripts/adapter_ablate.py src/ar2dlm/assets/smollm2-135m-drafter /tmp/top --drop-layers 0-14
    python scripts/heldout_tpf.py /tmp/r16 runs/data/distill-bench/distilled.jsonl

Post-hoc ablations of a trained adapter, each a question about what the drafter needs:
- `--rank r`: every LoRA update B A (rank R) cut to its r leading singular directions (the best rank-r
  approximation), saved as a rank-r adapter (lora_alpha scaled by r / R, so alpha / r and the update's scale
  stay). How much of the rank does the learned update use, and what does a step cost with the smaller adapter?
- `--drop attn|mlp`: the updates of the attention (q/k/v/o) or MLP (gate/up/down) projections set to zero.
- `--drop-layers a-b`: the updates of decoder layers a..b (inclusive) set to zero.
The mask row (the learned [MASK] embedding) is always kept. The copy keeps every other file of the folder.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ATTN, MLP = ("q_proj", "k_proj", "v_proj", "o_proj"), ("gate_proj", "up_proj", "down_proj")


def truncate(A: torch.Tensor, B: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """B A ([out, R] @ [R, in]) -> its best rank-r approximation as A' [r, in], B' [out, r]."""
    U, S, Vh = torch.linalg.svd(B.double() @ A.double(), full_matrices=False)
    root = S[:r].sqrt()
    return (root[:, None] * Vh[:r]).to(A.dtype).contiguous(), (U[:, :r] * root).to(B.dtype).contiguous()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("adapter", type=Path, help="a drafting adapter folder (adapter_model.safetensors inside)")
    parser.add_argument("out", type=Path, help="the folder to write the ablated copy to")
    parser.add_argument("--rank", type=int, default=None, help="cut every update to this rank")
    parser.add_argument("--drop", choices=("attn", "mlp"), default=None, help="zero these projections' updates")
    parser.add_argument("--drop-layers", default=None, help="zero the updates of layers A-B (inclusive)")
    args = parser.parse_args(argv)
    src = args.adapter / "adapter_model.safetensors"
    if not src.is_file():
        parser.error(f"{src} does not exist: give a drafting adapter folder")
    layers = None
    if args.drop_layers:
        m = re.fullmatch(r"(\d+)-(\d+)", args.drop_layers)
        if not m:
            parser.error(f"--drop-layers takes A-B (e.g. 0-14), got {args.drop_layers!r}")
        layers = range(int(m[1]), int(m[2]) + 1)
    tensors = load_file(src)
    out, changed = dict(tensors), 0
    for key in (k for k in tensors if k.endswith("lora_A.weight")):
        b_key = key.replace("lora_A", "lora_B")
        module = key.split(".")[-3]
        layer = re.search(r"\.layers\.(\d+)\.", key)
        drop = ((args.drop == "attn" and module in ATTN) or (args.drop == "mlp" and module in MLP)
                or (layers is not None and layer is not None and int(layer[1]) in layers))
        if drop:
            out[b_key] = torch.zeros_like(tensors[b_key])
            changed += 1
        elif args.rank is not None and args.rank < tensors[key].shape[0]:
            out[key], out[b_key] = truncate(tensors[key], tensors[b_key], args.rank)
            changed += 1
    if args.out.resolve() == args.adapter.resolve():
        parser.error("the copy must go to another folder than the adapter's")
    args.out.mkdir(parents=True, exist_ok=True)
    for f in args.adapter.iterdir():
        if f.is_file() and f.name != src.name:
            shutil.copy2(f, args.out / f.name)
    save_file(out, args.out / src.name, metadata={"format": "pt"})
    if args.rank is not None:
        config_file = args.out / "adapter_config.json"
        config = json.loads(config_file.read_text())
        if config.get("rank_pattern") or config.get("alpha_pattern") or config.get("use_rslora"):
            parser.error("--rank handles one rank and alpha for every module (no rank_pattern, alpha_pattern, rslora)")
        rank = min(args.rank, config["r"])
        config["lora_alpha"] = config["lora_alpha"] * rank / config["r"]
        config["r"] = rank
        config_file.write_text(json.dumps(config, indent=2) + "\n")
    print(f"{changed} of {sum(k.endswith('lora_A.weight') for k in tensors)} LoRA updates changed -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
