"""What a decode step costs with each of several drafters, in one process, rounds interleaved.

    python scripts/adapter_step_cost.py smollm2-135m /tmp/r16            # the shipped drafter and its rank-16 copy

For each model: decode/costs.measure (a step of n token slots over a cached 128-token context, relative to a
1-token AR forward) with the drafting adapter on the slot rows ("on") and with it off ("bare"). The rounds go over
every model in turn, so a busy moment of the machine hits them all alike; the median of the rounds is printed.
"""

from __future__ import annotations

import argparse
import statistics
import sys

from ar2dlm.decode import costs
from ar2dlm.model.lm import DiffusionLM


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+", help="bundled names, checkpoints or adapter folders")
    parser.add_argument("--slots", default="5,9,13,17", help="token slots per step (K + 1 for a chain of K)")
    parser.add_argument("--rounds", type=int, default=10, help="rounds over every model (default 10)")
    args = parser.parse_args(argv)
    slots = tuple(int(s) for s in args.slots.split(","))
    if any(s < 2 for s in slots):
        parser.error(f"--slots are steps of 2 or more slots, got {args.slots!r}")
    models = {name: DiffusionLM.from_pretrained(name) for name in args.models}
    runs = {name: {"on": [], "bare": []} for name in models}
    for _ in range(args.rounds):
        for name, lm in models.items():
            for kind, machinery in (("on", True), ("bare", False)):
                runs[name][kind].append(costs.measure(lm, (1, *slots), reps=5, machinery=machinery))
    first = next(iter(models.values()))
    print(f"{costs.machine_key(first.model.dtype)}: step cost / 1-token AR forward, median of {args.rounds} rounds")
    print("slots  " + "  ".join(f"{name} ({kind})" for name in models for kind in ("on", "bare")))
    for s in slots:
        print(f"{s:5d}  " + "  ".join(f"{statistics.median(t[s] for t in runs[name][kind]):.3f}"
                                      for name in models for kind in ("on", "bare")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
