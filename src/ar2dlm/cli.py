"""`ar2dlm VERB ...`: one verb = one function; flags are the function's keywords."""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
import time
import types
import typing
from pathlib import Path

from .core.config import (BENCH_SETS, MASKING_SCHEMES, SAMPLERS, BenchConfig, ConfigError, DecodeConfig, TuneConfig,
                     field_docs)

# DecodeConfig fields that are `generate` flags (eos_token_id is API-only); draft_len and proposals default to
# the checkpoint's (ar2dlm.json), so their flags default to None = "not given"
GENERATE_FIELDS = ("sampler", "mix_weight", "draft_len", "proposals", "ar", "adaptive", "max_new_tokens",
                   "temperature", "top_k", "top_p", "seed", "stop")
DEMO_FIELDS = ("max_new_tokens", "draft_len", "proposals", "sampler", "adaptive")
MODEL_DEFAULT = {"draft_len": None, "proposals": None, "adaptive": None}  # None: the model's ar2dlm.json


def cmd_convert(args) -> int:
    from .model.convert import convert

    convert(args.base, args.out, block_size=args.block_size, mask_token=args.mask_token,
            reuse_token=args.reuse_token, masking=args.masking, loss_weight=args.loss_weight, force=args.force)
    print(args.out)
    return 0


def cmd_generate(args) -> int:
    from .train.data import read_prompt_file
    from .decode.engine import Request, check_request, generate, stream
    from .model.lm import DiffusionLM

    if args.batch_size is not None and not args.json:
        raise ConfigError("--batch-size only applies with --json (streamed text decodes one prompt at a time): "
                          "add --json, or drop --batch-size")
    batch_size = 1 if args.batch_size is None else args.batch_size
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {batch_size}")
    prompts = [args.prompt] if args.prompt is not None else [r["prompt"] for r in read_prompt_file(args.prompts)]
    lm = DiffusionLM.from_pretrained(args.model, allow_ar=args.ar, dtype=_dtype(args))
    settings = {k: getattr(args, k) for k in GENERATE_FIELDS}
    settings["stop"] = tuple(args.stop or ())
    cfg = lm.decode_config(**settings)
    ids = lm.encode(prompts, chat=args.chat)
    check_request(lm, ids, cfg)  # every prompt is checked before any text is printed
    mode = "ar" if cfg.ar else f"{cfg.sampler} K={cfg.draft_len} |R|={cfg.proposals}"
    done = 0
    if args.json:
        try:
            for start in range(0, len(ids), batch_size):
                chunk = ids[start:start + batch_size]
                for i, g in enumerate(generate(lm, chunk, cfg)):
                    print(json.dumps({"index": start + i, "text": g.text, "token_ids": g.token_ids,
                                      "finish_reason": g.finish_reason, "stats": g.stats.as_dict()}), flush=True)
                done += len(chunk)
        except KeyboardInterrupt:
            print(f"\n[interrupted] {done} of {len(ids)} prompts decoded and printed", file=sys.stderr, flush=True)
            return 130
        return 0
    for i, prompt_ids in enumerate(ids):
        out, start = Request(lm, cfg), time.perf_counter()
        try:
            for piece in stream(lm, prompt_ids, cfg, out):
                sys.stdout.write(piece)
                sys.stdout.flush()
        except KeyboardInterrupt:
            out.stats.wall_time = time.perf_counter() - start
            print(f"\n{_stats_line(mode + ', interrupted', out.stats)}", file=sys.stderr, flush=True)
            print(f"[interrupted] during prompt {i + 1} of {len(ids)}", file=sys.stderr, flush=True)
            return 130
        print(f"\n{_stats_line(mode, out.stats)}", file=sys.stderr, flush=True)
    return 0


def _stats_line(mode: str, s) -> str:
    hist = " ".join(f"{k}:{v}" for k, v in sorted(s.accepted.items()))
    return (f"[{mode}] {s.new_tokens} tokens, {s.forwards} forwards, TPF {s.tpf:.2f}, "
            f"{s.new_tokens / max(s.wall_time, 1e-9):.1f} tok/s, {s.wall_time:.2f}s, accepted {{{hist}}}")


def cmd_demo(args) -> int:
    from .measure.demo import demo_prompts, run_demo
    from .model.lm import DiffusionLM

    lm = DiffusionLM.from_pretrained(args.model, dtype=_dtype(args))
    settings = {k: getattr(args, k) for k in DEMO_FIELDS}
    prompts = demo_prompts()
    if not _has_chat_template(lm):
        prompts = [(label, text, False) for label, text, _ in prompts]
        print(f"demo: {args.model} has no chat template: the requests are given as plain text", file=sys.stderr)
    rows = run_demo(lm, prompts, **settings)
    if args.json:
        print(json.dumps(rows))
    return 0


def _has_chat_template(lm) -> bool:
    return bool(getattr(lm.tokenizer, "chat_template", None))


def cmd_train(args, overrides: list[str]) -> int:
    from .train.trainer import main_train

    return main_train(args.config, overrides, args.resume)


def cmd_distill(args) -> int:
    from .model.bundled import BUNDLED, resolve_base
    from .train.data import read_prompt_file
    from .train.distill import distill
    from .model.lm import DiffusionLM

    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.limit is not None and args.limit < 1:
        raise ConfigError(f"--limit must be >= 1 (the first N prompts), got {args.limit}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file, not a directory")
    DecodeConfig(ar=True, max_new_tokens=args.max_new_tokens, sampler=args.sampler, temperature=args.temperature,
                 seed=args.seed)  # settings fail before the model loads
    read_prompt_file(args.prompts)
    # the teacher is the AR model: a bundled name means its base, not the shipped drafter
    model = resolve_base(args.model) if args.model in BUNDLED else args.model
    lm = DiffusionLM.from_pretrained(model, allow_ar=True)
    out = distill(lm, args.prompts, args.out, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                  sampler=args.sampler, temperature=args.temperature, seed=args.seed, limit=args.limit)
    print(out)
    return 0


def cmd_merge(args) -> int:
    from .core import files
    from .model.lm import DiffusionLM

    files.check_output_dir(args.out, args.force)
    lm = DiffusionLM.from_pretrained(args.adapter)
    kind = lm.settings.adapter
    if kind == "":
        raise ConfigError(f"{args.adapter} is a complete converted checkpoint, not an adapter folder: there is "
                          f"nothing to merge; use it as it is")
    if kind != "lora":
        raise ConfigError(f"{args.adapter} holds a {kind!r} adapter; only an ungated LoRA can be merged. "
                          "The drafting adapter acts on mask-slot rows only, so merging it into the weights "
                          "would change the AR path: ship the adapter folder instead")
    merged = lm.model.merge_and_unload()
    with files.output_dir(args.out, args.force) as tmp:
        merged.save_pretrained(tmp)
        lm.tokenizer.save_pretrained(tmp)
        dataclasses.replace(lm.settings, adapter="").save(tmp)
    print(args.out)
    return 0


def cmd_export(args) -> int:
    from .model.checkpoint import export

    out = export(args.adapter, args.out, dtype=args.dtype, force=args.force)
    size = sum(f.stat().st_size for f in out.iterdir())
    print(f"{out} ({size / 2**20:.1f} MiB)")
    return 0


def cmd_plot(args) -> int:
    from .measure.plot import plot_run

    for path in plot_run(args.run_dir):
        print(path)
    return 0


def cmd_prompts(args) -> int:
    from .train.prompts import write_prompt_sets

    for split, path in write_prompt_sets(args.out, force=args.force).items():
        print(f"{split}: {path}")
    return 0


DTYPES = ("float32", "bfloat16", "float16")
DTYPE_HELP = ("weights and activations (default float32). bfloat16 is much faster on CPUs with AVX512-BF16 and "
              "on GPUs, for AR and ar2dlm alike; greedy ar2dlm then matches the AR loop only up to bf16 rounding, "
              "which differs between a one-row and a many-row forward")


def _dtype(args):
    import torch

    return getattr(torch, getattr(args, "dtype", None) or "float32")


class ListOf:
    """argparse type: comma-separated values of one kind -> tuple ('' = empty); errors say what was expected."""

    def __init__(self, kind, words: str):
        self.kind, self.words = kind, words
        self.__name__ = f"list of {words}"

    def __call__(self, text: str) -> tuple:
        try:
            return tuple(self.kind(x.strip()) for x in text.split(",") if x.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {self.words}, got {text!r}") from None


def integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


_SCALARS = {int: (integer, "integers"), float: (number, "numbers"), str: (str, "names")}


def add_fields(parser, cls, names, defaults: dict | None = None, choices: dict | None = None,
               repeat: tuple = ()) -> None:
    """One flag per dataclass field: --field-name, its type, default and docstring; the dataclass validates."""
    docs, hints = field_docs(cls), typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name in names:
        flag = "--" + name.replace("_", "-")
        default = (defaults or {}).get(name, fields[name].default)
        help = docs.get(name, "").replace("%", "%%")
        if default is not None and not isinstance(default, bool) and "default" not in help:
            shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
            help += f" (default {shown})"
        kind = hints[name]
        if typing.get_origin(kind) in (typing.Union, types.UnionType):  # X | None: the flag takes an X
            kind = next(h for h in typing.get_args(kind) if h is not type(None))
        if kind is bool:
            if default is None:  # the model's ar2dlm.json decides unless the flag is given either way
                parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                                    help=help + " (default: as the model's ar2dlm.json says)")
            elif default:
                parser.add_argument("--no-" + name.replace("_", "-"), dest=name, action="store_false",
                                    help=f"turn off (on by default): {help}")
            else:
                parser.add_argument(flag, action="store_true", help=help)
        elif typing.get_origin(kind) is tuple:
            elem, words = _SCALARS[typing.get_args(kind)[0]]
            if name in repeat:
                parser.add_argument(flag, action="append", type=elem, help=help + " (repeatable)")
            else:
                parser.add_argument(flag, type=ListOf(elem, words), default=default, help=help)
        else:
            parser.add_argument(flag, type=_SCALARS[kind][0], default=default, help=help,
                                choices=(choices or {}).get(name))


def config_from(args, cls, **extra):
    """cls from the parsed flags of its fields (a flag left None takes the field's default)."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    given = {k: v for k, v in vars(args).items() if k in fields and (v is not None or fields[k].default is None)}
    return cls(**given, **extra)


def _plain_vocab(lm) -> dict:
    """The tokenizer's vocabulary without the mask token (which only converted models have)."""
    return {t: i for t, i in lm.tokenizer.get_vocab().items() if i != lm.mask_token_id}


def cmd_bench(args) -> int:
    from .measure import bench as B
    from .core import files
    from .model.lm import DiffusionLM

    cfg = config_from(args, BenchConfig)
    out = Path(args.out or f"runs/bench-{time.strftime('%Y%m%d-%H%M%S')}")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file, not a directory")
    for name in ("bench.json", *B.PLOT_FILES):  # before minutes of timing, not after
        files.check_output_file(out / name, args.force)
    lm = DiffusionLM.from_pretrained(args.model, dtype=_dtype(args))
    lm.name = args.model
    K = lm.settings.draft_len or lm.settings.block_size
    cfg = cfg.resolved(K, lm.settings.proposals or min(3, K))
    cfg = _drop_chat_set(lm, cfg, args.model, explicit=args.sets is not None)
    reference = None
    if args.reference:
        reference = DiffusionLM.from_pretrained(args.reference, dtype=_dtype(args), allow_ar=True)
        reference.name = args.reference
        if _plain_vocab(reference) != _plain_vocab(lm):
            raise ConfigError(f"--reference {args.reference} has another tokenizer than {args.model}: "
                              "outputs can only be compared token by token with the same vocabulary")
    prompt_sets = {name: B.load_prompt_set(lm, name, cfg.n_prompts) for name in cfg.sets}  # fail before timing
    opts = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()
            if k not in ("quick", "seed", "prompt_lengths")}
    report = B.bench(lm, seed=cfg.seed, reference=reference, log=lambda *a, **k: print(*a, **k),
                     prompt_sets=prompt_sets, **opts)
    if cfg.prompt_lengths:
        report["context_scaling"] = B.context_scaling(lm, list(cfg.prompt_lengths), cfg.max_new_tokens, cfg.runs,
                                                      log=lambda *a, **k: print(*a, **k))
    report["settings"] = opts
    files.write_text(out / "bench.json", json.dumps(report, indent=1), force=args.force)
    report["plots"] = [str(p) for p in B.plots(report, out)]
    print(B.table(report))
    print(f"(median tokens/s of {cfg.runs} runs after a warm-up; speedup = ratio to the same-stack AR loop "
          f"measured in the same run; {report['threads']} threads) -> {out}")
    print(json.dumps(report))
    return 0


def _drop_chat_set(lm, cfg, model: str, explicit: bool):
    """The chat prompt set needs a chat template: named by the user -> an error now; by default -> a note."""
    if "chat" not in cfg.sets or _has_chat_template(lm):
        return cfg
    if explicit:
        raise ConfigError(f"prompt set 'chat' needs a chat template, and {model}'s tokenizer has none: "
                          f"drop chat from --sets")
    print(f"{model} has no chat template: skipping the chat prompt set", file=sys.stderr)
    sets = tuple(s for s in cfg.sets if s != "chat")
    return dataclasses.replace(cfg, sets=sets)


def cmd_tune(args) -> int:
    from .measure import bench as B
    from .measure import tune as T
    from .model.lm import DiffusionLM

    cfg = config_from(args, TuneConfig)
    lm = DiffusionLM.from_pretrained(args.model, dtype=_dtype(args))
    cfg = _drop_chat_set(lm, cfg, args.model, explicit=args.sets is not None)
    prompts = [p for s in cfg.sets for p in B.load_prompt_set(lm, s, cfg.n_prompts)]
    result = T.tune(lm, prompts, max_len=cfg.max_draft_len, max_new_tokens=cfg.max_new_tokens)
    print("forward cost by token slots, in AR forwards (1 slot = one AR step):")
    print("  slots   decode step (adapter on slots)   bare base forward   drafting machinery")
    for n, c in result["forward_cost"].items():
        b = result["base_forward_cost"][n]
        print(f"  {n:>5}   {c:>30.3f}   {b:>17.3f}   {c - b:>+18.3f}")
    print(f"engine work outside the forward, per step in AR forwards: AR loop {result['ar_engine_cost']:+.3f}")
    for c in result["candidates"]:
        mode = " adaptive" if c.get("adaptive") else ""
        pred = (f"predicted TPF {c['predicted_tpf']:.2f}, predicted speedup {c['predicted_speedup']:.2f}x, "
                if "predicted_tpf" in c else "")
        print(f"K={c['draft_len']:>2} |R|={c['proposals']}{mode}: {pred}measured {c['measured_speedup']:.2f}x "
              f"({c['measured_tokens_per_s']:.1f} tok/s vs AR {result['ar_tokens_per_s']:.1f}); engine work "
              f"{c['engine_cost']:+.3f} AR forwards per step")
    best = result["best"]
    if cfg.grid:
        result["grid_search"] = T.grid_search(lm, prompts, best, max_new_tokens=cfg.max_new_tokens)
        gs = result["grid_search"]
        for r in gs["grid"]:
            print(f"grid K={r['draft_len']:>2} |R|={r['proposals']}: {r['tokens_per_s']:.1f} tok/s, "
                  f"{r['speedup']:.2f}x AR")
        print(f"tune's choice K={best['draft_len']} |R|={best['proposals']}: {gs['chosen']['tokens_per_s']:.1f} "
              f"tok/s = {gs['chosen_vs_best']:.2f} of the grid's best (K={gs['best']['draft_len']} "
              f"|R|={gs['best']['proposals']}, {gs['best']['tokens_per_s']:.1f} tok/s; AR {gs['ar_tokens_per_s']:.1f})")
    if not cfg.dry_run:
        T.write_defaults(lm.source, result)
        print(f"wrote draft_len={best['draft_len']} proposals={best['proposals']} "
              f"adaptive={bool(best.get('adaptive'))} and the forward-cost table "
              f"to {lm.source / 'ar2dlm.json'}")
    print(json.dumps(result))
    return 0


def cmd_eval(args) -> int:
    from .evaluate import run as E
    from .model.lm import DiffusionLM

    if args.lm_eval:
        raise ConfigError("--lm-eval must come right after `eval`: ar2dlm eval --lm-eval --model ar2dlm "
                          "--model_args pretrained=MODEL ... (the rest is lm-eval's command line)")
    cfg = config_from(args, E.EvalConfig)  # settings fail before the model loads
    out = Path(args.out or f"runs/eval-{cfg.task}-{cfg.form}")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file, not a directory")
    ar_only = not cfg.frontier and all(s in ("ar", "ar-sample") for s in cfg.settings)  # a base model is fine
    lm = DiffusionLM.from_pretrained(args.model, dtype=_dtype(args), allow_ar=ar_only)
    summary = E.evaluate(lm, cfg, out, args.model, force=args.force, progress=not args.no_progress)
    print(f"{cfg.task} ({cfg.form} form), {summary['problems']} problems, {summary['wall_seconds']:.0f}s -> {out}")
    print(E.table(summary["settings"]))
    print(json.dumps(summary))
    return 0


def cmd_plan(args) -> int:
    from .measure import plan as P

    cfg = config_from(args, P.PlanConfig)
    shape = P.model_shape(P.load_config(args.model))
    result = P.plan(shape, P.hardware(cfg.hardware, cfg.dtype), cfg)
    print(P.format_plan(result, P.SEED_FIGURES if args.model == "zaya1-8b" else None))
    if args.measure:
        result["measured"] = P.measured_vs_predicted(args.model, shape, P.Hardware(**result["hardware"]), cfg)
        print(P.format_measured(result["measured"]))
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
    c.add_argument("--block-size", type=integer, default=16, help="tokens per drafted block, 1..64 and below the "
                   "model's context (default 16)")
    c.add_argument("--mask-token", default="<|mask|>", help="text of the mask token to add (default <|mask|>)")
    c.add_argument("--reuse-token", action="store_true",
                   help="use an existing (reserved, unused) token named by --mask-token instead of adding one")
    c.add_argument("--masking", choices=MASKING_SCHEMES, default="full", help="training masking scheme")
    c.add_argument("--loss-weight", type=number, default=1.0, help="alpha of the AR loss (default 1)")
    c.add_argument("--force", action="store_true", help="replace OUT if it exists and is not empty")
    c.set_defaults(fn=cmd_convert)

    g = sub.add_parser("generate", help="decode prompts with TiDAR (or plain AR with --ar) and print stats",
                       description="Stream the model's answer to each prompt, then print tokens, forward passes, "
                       "tokens per forward (TPF), speed and the accepted-length histogram.")
    g.add_argument("model", help="converted checkpoint, adapter folder, or bundled name smollm2-135m "
                   "(or any HF causal LM with --ar)")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="one prompt text")
    src.add_argument("--prompts", help="JSONL file: one JSON string or {\"prompt\": ...} per line")
    g.add_argument("--chat", action="store_true", help="wrap each prompt in the model's chat template")
    add_fields(g, DecodeConfig, GENERATE_FIELDS, defaults=MODEL_DEFAULT, choices={"sampler": SAMPLERS},
               repeat=("stop",))
    g.add_argument("--batch-size", type=integer, default=None, help="prompts decoded together (with --json only)")
    g.add_argument("--json", action="store_true", help="one JSON line per prompt instead of streamed text")
    g.add_argument("--dtype", choices=DTYPES, default="float32", help=DTYPE_HELP)
    g.set_defaults(fn=cmd_generate)

    de = sub.add_parser("demo", help="stream a chat, a code and a prose answer; TPF and speedup over AR for each",
                        description="Decode three bench prompts (chat, code, prose) with MODEL, streaming the text, "
                        "then decode each with the same-stack AR loop in the same run and print tokens per "
                        "forward, both speeds, the speedup and whether the text equals AR's.")
    de.add_argument("model", nargs="?", default="smollm2-135m",
                    help="converted checkpoint, adapter folder or bundled name (default: smollm2-135m)")
    add_fields(de, DecodeConfig, DEMO_FIELDS, defaults={"max_new_tokens": 96, **MODEL_DEFAULT},
               choices={"sampler": SAMPLERS})
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
    s.add_argument("--max-new-tokens", type=integer, default=128)
    s.add_argument("--batch-size", type=integer, default=8)
    s.add_argument("--sampler", choices=["greedy", "lossless"], default="greedy",
                   help="greedy continuations, or sampled ones (lossless = the AR distribution)")
    s.add_argument("--temperature", type=number, default=1.0, help="for --sampler lossless (default 1)")
    s.add_argument("--seed", type=integer, default=0)
    s.add_argument("--limit", type=integer, default=None, help="only the first N prompts")
    s.set_defaults(fn=cmd_distill)

    m = sub.add_parser("merge", help="merge an ungated LoRA adapter into a full converted checkpoint")
    m.add_argument("adapter", help="adapter folder (a run's final/)")
    m.add_argument("out", help="output directory (must not exist or be empty)")
    m.add_argument("--force", action="store_true", help="replace OUT if it exists and is not empty")
    m.set_defaults(fn=cmd_merge)

    ex = sub.add_parser("export", help="a compact copy of an adapter folder (weights in bf16, no tokenizer)",
                        description="Copy ADAPTER (a run's final/) into OUT with its weights cast to --dtype and "
                        "without tokenizer files (rebuilt from the base model on load). This is how the bundled "
                        "smollm2-135m drafter is made.")
    ex.add_argument("adapter", help="adapter folder (a run's final/)")
    ex.add_argument("out", help="output directory (must not exist or be empty)")
    ex.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ex.add_argument("--force", action="store_true", help="replace OUT if it exists and is not empty")
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
    add_fields(b, BenchConfig, [f.name for f in dataclasses.fields(BenchConfig)], defaults={"sets": None},
               choices={})
    b.add_argument("--reference", help="a model to compare MODEL's greedy output with (e.g. the base of an ungated "
                   "conversion): exact-match rate, common prefix, and the reference's NLL of both outputs")
    b.add_argument("--out", help="folder for bench.json and plots (default runs/bench-TIME)")
    b.add_argument("--force", action="store_true", help="replace bench.json and plots already in --out")
    b.add_argument("--dtype", choices=DTYPES, default="float32", help=DTYPE_HELP)
    b.set_defaults(fn=cmd_bench)

    tu = sub.add_parser("tune", help="choose draft_len and proposals for this machine; write them as defaults",
                        description="Measure the forward cost by number of token slots and the acceptance on a "
                        "prompt set, predict tokens/s for draft length x proposals, time the best predictions "
                        "against the AR loop, and write the fastest into the model's ar2dlm.json.")
    tu.add_argument("model", help="converted checkpoint, adapter folder or bundled name (its ar2dlm.json is "
                    "updated; for smollm2-135m the copy in $AR2DLM_HOME)")
    add_fields(tu, TuneConfig, [f.name for f in dataclasses.fields(TuneConfig)], defaults={"sets": None})
    tu.add_argument("--dtype", choices=DTYPES, default="float32", help=DTYPE_HELP)
    tu.set_defaults(fn=cmd_tune)

    ev = sub.add_parser("eval", help="task quality (HumanEval in a sandbox, IFEval-style rules) of decoding "
                        "settings, with TPF, tau and speedup over AR",
                        description="Decode a task's problems with each setting (ar, greedy, ar-sample, lossless, "
                        "mix:W), score the answers (code in a sandbox: own process and directory, time, memory and "
                        "CPU limits, no network), and print score with 95% CI, TPF, tau, tokens/s and speedup "
                        "over the AR loop of the same run. OUT/results.jsonl grows as answers are scored; a rerun "
                        "resumes. --frontier sweeps ar, ar-sample, greedy, lossless and mix weights and draws "
                        "OUT/frontier.png.")
    ev.add_argument("model", help="converted checkpoint, adapter folder or bundled name (smollm2-135m)")
    from .evaluate.run import EvalConfig
    from .evaluate.tasks import FORMS, TASKS
    add_fields(ev, EvalConfig, [f.name for f in dataclasses.fields(EvalConfig)],
               choices={"task": TASKS, "form": FORMS})
    ev.add_argument("--lm-eval", action="store_true", help="first flag only: `ar2dlm eval --lm-eval LM_EVAL_ARGS...` "
                    "runs lm-eval's CLI with the `ar2dlm` model registered (needs the eval extra)")
    ev.add_argument("--out", help="folder for results.jsonl, summary.json, frontier.png (default runs/eval-TASK-FORM)")
    ev.add_argument("--force", action="store_true", help="discard earlier results in --out instead of resuming")
    ev.add_argument("--no-progress", action="store_true", help="no progress bar")
    ev.add_argument("--dtype", choices=DTYPES, default="float32", help=DTYPE_HELP)
    ev.set_defaults(fn=cmd_eval)
    pn = sub.add_parser("plan", help="predict proposals per forward and the best K, |R| for an accelerator "
                        "(roofline; no weights needed)",
                        description="From a model config and an accelerator's peak bandwidth and FLOP/s, predict "
                        "the cost of a forward by token slots (weights, MoE experts touched, KV and conv state, "
                        "FLOPs with attention), the proposals that fit for free, and the best draft length and "
                        "proposal count for given acceptance rates. The last stdout line is JSON.")
    pn.add_argument("model", help="config.json, checkpoint directory, zaya1-8b (shipped config) or smollm2-135m")
    from .measure.plan import DTYPE_BYTES, HARDWARE_NAMES, PlanConfig
    add_fields(pn, PlanConfig, [f.name for f in dataclasses.fields(PlanConfig)],
               choices={"hardware": HARDWARE_NAMES, "dtype": tuple(DTYPE_BYTES)})
    pn.add_argument("--measure", action="store_true", help="also time the model's forwards by slots (tune's "
                    "forward_cost; needs its weights) next to the prediction")
    pn.set_defaults(fn=cmd_plan)

    pr = sub.add_parser("prompts", help="write the offline prompt sets (train.jsonl, bench.jsonl)")
    pr.add_argument("out", help="output folder")
    pr.add_argument("--force", action="store_true", help="replace train.jsonl and bench.jsonl if OUT has them")
    pr.set_defaults(fn=cmd_prompts)
    return p


def cli_words(message: str, parser: argparse.ArgumentParser | None) -> str:
    """An API message in the command line's words: `name=True` becomes the verb's flag `--name`."""
    if parser is None:
        return message
    for action in parser._actions:
        flags = [o for o in action.option_strings if o.startswith("--")]
        if flags and isinstance(action, (argparse._StoreTrueAction, argparse.BooleanOptionalAction)):
            message = re.sub(rf"\b{action.dest}=True\b", flags[0], message)
    if any("--ar" in a.option_strings for a in parser._actions):
        message = message.replace("allow_ar=True", "--ar")
    return message


def main(argv: list[str] | None = None) -> int:
    from .model import NotConvertedError

    raw = sys.argv[1:] if argv is None else list(argv)
    if raw[:2] == ["eval", "--lm-eval"]:  # the rest is lm-eval's own command line
        try:
            from .evaluate.lm_eval_model import run_cli
        except ConfigError as e:
            print(f"ar2dlm eval: error: {e}", file=sys.stderr)
            return 2
        return run_cli(raw[2:])
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "takes_overrides", False):
        build_parser().parse_args(argv)  # the usual "unrecognized arguments" error
    verb_parser = parser._subparsers._group_actions[0].choices.get(args.verb)
    try:
        if getattr(args, "takes_overrides", False):
            return args.fn(args, extra)
        return args.fn(args)
    except NotConvertedError as e:
        message = str(e) if args.verb == "generate" else \
            (f"{e.path} has no ar2dlm.json: it is an unconverted AR model; convert it first: "
             f"`ar2dlm convert {e.path} OUT_DIR`")
        print(f"ar2dlm {args.verb}: error: {cli_words(message, verb_parser)}", file=sys.stderr)
        return 2
    except (ConfigError, OSError) as e:  # OSError: a file problem no loader named yet (its message names the file)
        print(f"ar2dlm {args.verb}: error: {cli_words(str(e), verb_parser)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\nar2dlm {args.verb}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
