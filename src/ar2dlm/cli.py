"""`ar2dlm VERB ...`: one verb = one function; flags are the function's keywords."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .config import ConfigError, DecodeConfig, SAMPLERS, MASKING_SCHEMES


def cmd_convert(args) -> int:
    from .convert import convert

    convert(args.base, args.out, block_size=args.block_size, mask_token=args.mask_token,
            reuse_token=args.reuse_token, masking=args.masking, loss_weight=args.loss_weight)
    print(args.out)
    return 0


def cmd_generate(args) -> int:
    from .data import read_prompt_file
    from .decode.engine import Request, check_request, stream
    from .model import DiffusionLM

    lm = DiffusionLM.from_pretrained(args.model, allow_ar=args.ar, dtype=_dtype(args))
    prompts = [args.prompt] if args.prompt is not None else [r["prompt"] for r in read_prompt_file(args.prompts)]
    settings = {k: getattr(args, k) for k in ("max_new_tokens", "draft_len", "proposals", "sampler", "mix_weight",
                                              "temperature", "top_k", "top_p", "seed", "ar", "adaptive")}
    settings["stop"] = tuple(args.stop or ())
    cfg = lm.decode_config(**settings)
    if args.batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {args.batch_size}")
    ids = lm.encode(prompts, chat=args.chat)
    check_request(lm, ids, cfg)  # every prompt is checked before any text is printed
    if args.json:
        for start in range(0, len(ids), args.batch_size):
            chunk = ids[start:start + args.batch_size]
            from .decode.engine import generate
            for i, g in enumerate(generate(lm, chunk, cfg)):
                print(json.dumps({"index": start + i, "text": g.text, "token_ids": g.token_ids,
                                  "finish_reason": g.finish_reason, "stats": g.stats.as_dict()}), flush=True)
        return 0
    for i, prompt_ids in enumerate(ids):
        out = Request(lm, cfg)
        for piece in stream(lm, prompt_ids, cfg, out):
            sys.stdout.write(piece)
            sys.stdout.flush()
        s = out.stats
        mode = "ar" if cfg.ar else f"{cfg.sampler} K={cfg.draft_len} |R|={cfg.proposals}"
        hist = " ".join(f"{k}:{v}" for k, v in sorted(s.accepted.items()))
        print(f"\n[{mode}] {s.new_tokens} tokens, {s.forwards} forwards, TPF {s.tpf:.2f}, "
              f"{s.new_tokens / max(s.wall_time, 1e-9):.1f} tok/s, {s.wall_time:.2f}s, accepted {{{hist}}}",
              file=sys.stderr, flush=True)
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo
    from .model import DiffusionLM

    lm = DiffusionLM.from_pretrained(args.model, dtype=_dtype(args))
    settings = {k: getattr(args, k) for k in ("draft_len", "proposals", "sampler", "adaptive")}
    rows = run_demo(lm, max_new_tokens=args.max_new_tokens, **settings)
    if args.json:
        print(json.dumps(rows))
    return 0


def cmd_train(args, overrides: list[str]) -> int:
    from .train import main_train

    return main_train(args.config, overrides, args.resume)


def cmd_distill(args) -> int:
    from .bundled import BUNDLED, resolve_base
    from .distill import distill
    from .model import DiffusionLM

    # the teacher is the AR model: a bundled name means its base, not the shipped drafter
    model = resolve_base(args.model) if args.model in BUNDLED else args.model
    lm = DiffusionLM.from_pretrained(model, allow_ar=True)
    if args.batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {args.batch_size}")
    out = distill(lm, args.prompts, args.out, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                  sampler=args.sampler, temperature=args.temperature, seed=args.seed, limit=args.limit)
    print(out)
    return 0


def cmd_merge(args) -> int:
    from .model import DiffusionLM

    lm = DiffusionLM.from_pretrained(args.adapter)
    kind = lm.settings.adapter
    if kind != "lora":
        raise ConfigError(f"{args.adapter} holds a {kind or 'merged'!r} model; only an ungated LoRA can be merged. "
                          "The drafting adapter acts on mask-slot rows only, so merging it into the weights "
                          "would change the AR path: ship the adapter folder instead")
    import dataclasses

    merged = lm.model.merge_and_unload()
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out} exists and is not empty")
    merged.save_pretrained(out)
    lm.tokenizer.save_pretrained(out)
    dataclasses.replace(lm.settings, adapter="").save(out)
    print(out)
    return 0


def cmd_export(args) -> int:
    from .adapter import export

    out = export(args.adapter, args.out, dtype=args.dtype)
    size = sum(f.stat().st_size for f in out.iterdir())
    print(f"{out} ({size / 2**20:.1f} MiB)")
    return 0


def cmd_plot(args) -> int:
    from .plot import plot_run

    for path in plot_run(args.run_dir):
        print(path)
    return 0


def cmd_prompts(args) -> int:
    from .prompts import write_prompt_sets

    for split, path in write_prompt_sets(args.out).items():
        print(f"{split}: {path}")
    return 0


DTYPES = ("float32", "bfloat16", "float16")
DTYPE_HELP = ("weights and activations (default float32). bfloat16 is much faster on CPUs with AVX512-BF16 and "
              "on GPUs, for AR and ar2dlm alike; greedy ar2dlm then matches the AR loop only up to bf16 rounding, "
              "which differs between a one-row and a many-row forward")


def _dtype(args):
    import torch

    return getattr(torch, getattr(args, "dtype", None) or "float32")


def _list(kind):
    return lambda text: [kind(x) for x in text.split(",") if x]


def _plain_vocab(lm) -> dict:
    """The tokenizer's vocabulary without the mask token (which only converted models have)."""
    return {t: i for t, i in lm.tokenizer.get_vocab().items() if i != lm.mask_token_id}


def cmd_bench(args) -> int:
    import time as _time

    from . import bench as B
    from .model import DiffusionLM

    lm = DiffusionLM.from_pretrained(args.model, dtype=_dtype(args))
    lm.name = args.model
    K = lm.settings.draft_len or lm.settings.block_size
    R = lm.settings.proposals or min(3, K)
    quick = args.quick
    opts = {
        "sets": args.sets or ["code", "prose", "chat"],
        "n_prompts": args.n_prompts or (2 if quick else 10),
        "batch_sizes": args.batch_sizes or ([1] if quick else [1, 4]),
        "runs": args.runs or (2 if quick else 3),
        "max_new_tokens": args.max_new_tokens or (40 if quick else 128),
        "draft_lens": args.draft_lens or ([K] if quick else sorted({4, 8, K})),
        "proposals": args.proposals or ([R] if quick else sorted({1, R})),
        "mix_weights": args.mix_weights if args.mix_weights is not None else ([0.5, 1.0] if quick
                                                                              else [0.25, 0.5, 0.75, 1.0]),
        "samplers": args.samplers or ["greedy", "lossless", "adaptive"],
        "hf": not args.no_hf,
    }
    reference = None
    if args.reference:
        reference = DiffusionLM.from_pretrained(args.reference, dtype=_dtype(args), allow_ar=True)
        reference.name = args.reference
        if _plain_vocab(reference) != _plain_vocab(lm):
            raise ConfigError(f"--reference {args.reference} has another tokenizer than {args.model}: "
                              "outputs can only be compared token by token with the same vocabulary")
    report = B.bench(lm, seed=args.seed, reference=reference, log=lambda *a, **k: print(*a, **k), **opts)
    report["settings"] = opts
    out = Path(args.out or f"runs/bench-{_time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(report, indent=1))
    report["plots"] = [str(p) for p in B.plots(report, out)]
    print(B.table(report))
    print(f"(median tokens/s of {opts['runs']} runs after a warm-up; speedup = ratio to the same-stack AR loop "
          f"measured in the same run; {report['threads']} threads) -> {out}")
    print(json.dumps(report))
    return 0


def cmd_tune(args) -> int:
    from . import bench as B
    from . import tune as T
    from .model import DiffusionLM

    lm = DiffusionLM.from_pretrained(args.model, dtype=_dtype(args))
    prompts = [p for s in (args.sets or ["code", "prose", "chat"]) for p in B.load_prompt_set(lm, s, args.n_prompts)]
    result = T.tune(lm, prompts, max_len=args.max_draft_len, max_new_tokens=args.max_new_tokens)
    for c in result["candidates"]:
        print(f"K={c['draft_len']:>2} |R|={c['proposals']}: predicted TPF {c['predicted_tpf']:.2f}, "
              f"predicted speedup {c['predicted_speedup']:.2f}x, measured {c['measured_speedup']:.2f}x "
              f"({c['measured_tokens_per_s']:.1f} tok/s vs AR {result['ar_tokens_per_s']:.1f})")
    best = result["best"]
    if args.grid:
        result["grid_search"] = T.grid_search(lm, prompts, best, max_new_tokens=args.max_new_tokens)
        gs = result["grid_search"]
        for r in gs["grid"]:
            print(f"grid K={r['draft_len']:>2} |R|={r['proposals']}: {r['tokens_per_s']:.1f} tok/s, "
                  f"{r['speedup']:.2f}x AR")
        print(f"tune's choice K={best['draft_len']} |R|={best['proposals']}: {gs['chosen']['tokens_per_s']:.1f} "
              f"tok/s = {gs['chosen_vs_best']:.2f} of the grid's best (K={gs['best']['draft_len']} "
              f"|R|={gs['best']['proposals']}, {gs['best']['tokens_per_s']:.1f} tok/s; AR {gs['ar_tokens_per_s']:.1f})")
    if not args.dry_run:
        T.write_defaults(lm.source, result)
        print(f"wrote draft_len={best['draft_len']} proposals={best['proposals']} and the forward-cost table "
              f"to {lm.source / 'ar2dlm.json'}")
    print(json.dumps(result))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ar2dlm", description="Convert an autoregressive HF causal LM into a TiDAR-style "
                                "block-diffusion LM, and decode it (one forward verifies the last draft and drafts "
                                "the next block).")
    sub = p.add_subparsers(dest="verb", required=True)

    c = sub.add_parser("convert", help="add a mask token and ar2dlm.json to a HF causal LM",
                       description="Convert BASE (a local HF checkpoint directory, or 'smollm2-135m' for the bundled "
                       "SmolLM2-135M-Instruct) into OUT, an HF directory that still loads as an AR model.")
    c.add_argument("base", help="HF checkpoint directory or bundled name (smollm2-135m)")
    c.add_argument("out", help="output directory (must not exist or be empty)")
    c.add_argument("--block-size", type=int, default=16, help="tokens per drafted block (default 16)")
    c.add_argument("--mask-token", default="<|mask|>", help="text of the mask token to add (default <|mask|>)")
    c.add_argument("--reuse-token", action="store_true",
                   help="use an existing (reserved, unused) token named by --mask-token instead of adding one")
    c.add_argument("--masking", choices=MASKING_SCHEMES, default="full", help="training masking scheme")
    c.add_argument("--loss-weight", type=float, default=1.0, help="alpha of the AR loss (default 1)")
    c.set_defaults(fn=cmd_convert)

    d = DecodeConfig()
    g = sub.add_parser("generate", help="decode prompts with TiDAR (or plain AR with --ar) and print stats",
                       description="Stream the model's answer to each prompt, then print tokens, forward passes, "
                       "tokens per forward (TPF), speed and the accepted-length histogram.")
    g.add_argument("model", help="converted checkpoint, adapter folder, or bundled name smollm2-135m "
                   "(or any HF causal LM with --ar)")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="one prompt text")
    src.add_argument("--prompts", help="JSONL file: one JSON string or {\"prompt\": ...} per line")
    g.add_argument("--chat", action="store_true", help="wrap each prompt in the model's chat template")
    g.add_argument("--sampler", choices=SAMPLERS, default=d.sampler,
                   help="greedy (== AR greedy), lossless (== AR distribution), mix (logit mixing, faster)")
    g.add_argument("--mix-weight", type=float, default=d.mix_weight, help="w in [0, 1] for --sampler mix")
    g.add_argument("--draft-len", type=int, default=None, help="K, tokens per draft (default: the model's)")
    g.add_argument("--proposals", type=int, default=None, help="|R|, proposals per forward, 1..K")
    g.add_argument("--ar", action="store_true", help="plain AR decoding on the same model and cache")
    g.add_argument("--adaptive", action="store_true",
                   help="shorten the draft (down to plain AR steps) while acceptance is low; grow it back after")
    g.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens)
    g.add_argument("--temperature", type=float, default=d.temperature)
    g.add_argument("--top-k", type=int, default=d.top_k, help="0 = off")
    g.add_argument("--top-p", type=float, default=d.top_p, help="1 = off")
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", help="stop string (repeatable)")
    g.add_argument("--batch-size", type=int, default=1, help="prompts decoded together with --json")
    g.add_argument("--json", action="store_true", help="one JSON line per prompt instead of streamed text")
    g.add_argument("--dtype", choices=DTYPES, default="float32", help=DTYPE_HELP)
    g.set_defaults(fn=cmd_generate)

    de = sub.add_parser("demo", help="stream a chat, a code and a prose answer; TPF and speedup over AR for each",
                        description="Decode three bench prompts (chat, code, prose) with MODEL, streaming the text, "
                        "then decode each with the same-stack AR loop in the same run and print tokens per "
                        "forward, both speeds, the speedup and whether the text equals AR's.")
    de.add_argument("model", nargs="?", default="smollm2-135m",
                    help="converted checkpoint, adapter folder or bundled name (default: smollm2-135m)")
    de.add_argument("--max-new-tokens", type=int, default=96)
    de.add_argument("--draft-len", type=int, default=None, help="K (default: the model's tuned default)")
    de.add_argument("--proposals", type=int, default=None, help="|R| (default: the model's tuned default)")
    de.add_argument("--sampler", choices=SAMPLERS, default="greedy")
    de.add_argument("--adaptive", action="store_true", help="adaptive draft length")
    de.add_argument("--json", action="store_true", help="also print the per-prompt numbers as one JSON line")
    de.add_argument("--dtype", choices=DTYPES, default="float32", help=DTYPE_HELP)
    de.set_defaults(fn=cmd_demo)

    t = sub.add_parser("train", help="train a drafting model from a YAML recipe (accelerate-ready)",
                       description="Train with the TiDAR objective. Any config field can be overridden as "
                       "--section.field VALUE (e.g. --optim.lr 1e-4 --schedule.max_steps 200). Multi-process: "
                       "accelerate launch --config_file recipes/accelerate/ddp.yaml -m ar2dlm train --config ...")
    t.add_argument("--config", required=True, help="recipe YAML (a serialized TrainConfig), e.g. recipes/*.yaml")
    t.add_argument("--resume", action="store_true", help="continue from the run's last checkpoint")
    t.set_defaults(fn=cmd_train, takes_overrides=True)

    s = sub.add_parser("distill", help="write the model's own AR continuations of prompts as training data",
                       description="Greedy (or sampled) AR continuations of every prompt, batched, resumable: "
                       "writes OUT/distilled.jsonl with token ids (prompt_ids, completion_ids).")
    s.add_argument("model", help="checkpoint directory or bundled name (AR decoding; conversion not needed)")
    s.add_argument("--prompts", required=True, help="JSONL: {\"prompt\": text, \"id\"?, \"chat\"?} per line")
    s.add_argument("--out", required=True, help="output folder")
    s.add_argument("--max-new-tokens", type=int, default=128)
    s.add_argument("--batch-size", type=int, default=8)
    s.add_argument("--sampler", choices=["greedy", "lossless"], default="greedy",
                   help="greedy continuations, or sampled ones (lossless = the AR distribution)")
    s.add_argument("--temperature", type=float, default=1.0)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--limit", type=int, default=None, help="only the first N prompts")
    s.set_defaults(fn=cmd_distill)

    m = sub.add_parser("merge", help="merge an ungated LoRA adapter into a full converted checkpoint")
    m.add_argument("adapter", help="adapter folder (a run's final/)")
    m.add_argument("out", help="output directory")
    m.set_defaults(fn=cmd_merge)

    ex = sub.add_parser("export", help="a compact copy of an adapter folder (weights in bf16, no tokenizer)",
                        description="Copy ADAPTER (a run's final/) into OUT with its weights cast to --dtype and "
                        "without tokenizer files (rebuilt from the base model on load). This is how the bundled "
                        "smollm2-135m drafter is made.")
    ex.add_argument("adapter", help="adapter folder (a run's final/)")
    ex.add_argument("out", help="output directory (must not exist or be empty)")
    ex.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ex.set_defaults(fn=cmd_export)

    pl = sub.add_parser("plot", help="PNG curves of a run's metrics.jsonl")
    pl.add_argument("run_dir")
    pl.set_defaults(fn=cmd_plot)

    b = sub.add_parser("bench", help="tokens/s and TPF against the same-stack AR loop and HF generate",
                       description="Measure, in one process and interleaved run by run, the same-stack AR loop, "
                       "HF generate, HF prompt-lookup decoding and ar2dlm's samplers over draft lengths and "
                       "proposal counts, on bench prompts never used in training. Prints a table; the last "
                       "stdout line is JSON; plots and bench.json go to --out.")
    b.add_argument("model", help="converted checkpoint, adapter folder or bundled name (smollm2-135m)")
    b.add_argument("--quick", action="store_true", help="a small preset (a few minutes on 2 CPU cores)")
    b.add_argument("--sets", type=_list(str), help="prompt sets: code,prose,chat or JSONL files")
    b.add_argument("--n-prompts", type=int, help="prompts per set")
    b.add_argument("--batch-sizes", type=_list(int), help="e.g. 1,4")
    b.add_argument("--runs", type=int, help="timed runs per configuration (median), after one warm-up")
    b.add_argument("--max-new-tokens", type=int)
    b.add_argument("--draft-lens", type=_list(int), help="K values, e.g. 4,8,16")
    b.add_argument("--proposals", type=_list(int), help="|R| values, e.g. 1,3")
    b.add_argument("--mix-weights", type=_list(float), help="mix sampler weights, e.g. 0.25,0.5,1 ('' = none)")
    b.add_argument("--samplers", type=_list(str),
                   help="greedy,lossless,adaptive (adaptive = greedy with adaptive draft length); default all three")
    b.add_argument("--no-hf", action="store_true", help="skip the HF generate baselines")
    b.add_argument("--reference", help="a model to compare MODEL's greedy output with (e.g. the base of an ungated "
                   "conversion): exact-match rate, common prefix, and the reference's NLL of both outputs")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--out", help="folder for bench.json and plots (default runs/bench-TIME)")
    b.add_argument("--dtype", choices=DTYPES, default="float32", help=DTYPE_HELP)
    b.set_defaults(fn=cmd_bench)

    tu = sub.add_parser("tune", help="choose draft_len and proposals for this machine; write them as defaults",
                        description="Measure the forward cost by number of token slots and the acceptance on a "
                        "prompt set, predict tokens/s for draft length x proposals, time the best predictions "
                        "against the AR loop, and write the fastest into the model's ar2dlm.json.")
    tu.add_argument("model", help="converted checkpoint, adapter folder or bundled name (its ar2dlm.json is "
                    "updated; for smollm2-135m the copy in $AR2DLM_HOME)")
    tu.add_argument("--sets", type=_list(str), help="prompt sets: code,prose,chat or JSONL files")
    tu.add_argument("--n-prompts", type=int, default=3, help="prompts per set")
    tu.add_argument("--max-draft-len", type=int, default=16)
    tu.add_argument("--max-new-tokens", type=int, default=64)
    tu.add_argument("--dry-run", action="store_true", help="print, do not write ar2dlm.json")
    tu.add_argument("--grid", action="store_true",
                    help="also time every draft length x proposals of a grid on the same prompts and report how "
                    "close the choice is to the fastest (slow: minutes per setting on a CPU)")
    tu.add_argument("--dtype", choices=DTYPES, default="float32", help=DTYPE_HELP)
    tu.set_defaults(fn=cmd_tune)

    pr = sub.add_parser("prompts", help="write the offline prompt sets (train.jsonl, bench.jsonl)")
    pr.add_argument("out", help="output folder")
    pr.set_defaults(fn=cmd_prompts)
    return p


def main(argv: list[str] | None = None) -> int:
    args, extra = build_parser().parse_known_args(argv)
    if extra and not getattr(args, "takes_overrides", False):
        build_parser().parse_args(argv)  # the usual "unrecognized arguments" error
    try:
        if getattr(args, "takes_overrides", False):
            return args.fn(args, extra)
        return args.fn(args)
    except (ConfigError, FileNotFoundError) as e:
        print(f"ar2dlm {args.verb}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
