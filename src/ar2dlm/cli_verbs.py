"""The verbs of `ar2dlm VERB ...`: one function each, taking the parsed args and returning the exit code.

cli.py builds each verb's parser (its help is the function's docstring: first paragraph the summary, the rest the
description) and dispatches to it; the helpers here are what several verbs share (loading the model and saying what
it computes in, the exactness verdict, output-folder checks)."""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

from .core import files
from .core.errors import ConfigError
from .core.flags import config_from, given
from .core.hardware import describe, machine
from .core.validation import check
from .decode.engine import Request, check_request, generate, stream
from .evaluate import run as eval_run
from .evaluate import sandbox
from .evaluate.config import EvalConfig
from .measure import bench, plan, tune
from .measure.bench_config import BenchConfig, without_chat
from .measure.demo import demo_prompts, run_demo
from .measure.plan import PlanConfig
from .measure.plot import plot_run
from .measure.tune_config import TuneConfig
from .model.bundled import BUNDLED, resolve_base, resolve_model
from .model.convert import convert
from .model.export import export, merge
from .model.lm import DiffusionLM
from .model.settings import ConvertConfig, LoadConfig
from .train.config import DistillConfig
from .train.data import read_prompt_file
from .train.distill import distill
from .train.prompts import write_prompt_sets
from .train.trainer import main_train

# DecodeConfig fields that are `generate` flags (eos_token_id is API-only); draft_len, proposals and adaptive
# default to the checkpoint's (ar2dlm.json), so their flags default to None = "not given"
GENERATE_FIELDS = ("sampler", "mix_weight", "draft_len", "proposals", "tree", "ar", "adaptive", "max_new_tokens",
                   "temperature", "top_k", "top_p", "seed", "stop", "candidates")
DEMO_FIELDS = ("max_new_tokens", "draft_len", "proposals", "tree", "sampler", "adaptive")
# None: the model's ar2dlm.json
MODEL_DEFAULT = {"draft_len": None, "proposals": None, "adaptive": None, "tree": None, "candidates": None}


def cmd_convert(args) -> int:
    """add a mask token and ar2dlm.json to a HF causal LM

    Convert BASE (a local HF checkpoint directory, or 'smollm2-135m' for the bundled SmolLM2-135M-Instruct) into
    OUT, an HF directory that still loads as an AR model."""
    cfg = config_from(args, ConvertConfig)
    convert(args.base, args.out, force=args.force, **dataclasses.asdict(cfg))
    print(args.out)
    return 0


def cmd_generate(args) -> int:
    """decode prompts with TiDAR (or plain AR with --ar) and print stats

    Stream the model's answer to each prompt, then print tokens, forward passes, tokens per forward (TPF), speed and
    the accepted-length histogram."""
    check(args.batch_size is None or args.json, "--batch-size only applies with --json (streamed text decodes one "
                                                "prompt at a time): add --json, or drop --batch-size", "batch_size")
    batch_size = 1 if args.batch_size is None else args.batch_size
    check(batch_size >= 1, f"--batch-size must be >= 1, got {batch_size}", "batch_size")
    prompts = [args.prompt] if args.prompt is not None else [r["prompt"] for r in read_prompt_file(args.prompts)]
    lm = _load(args, allow_ar=args.ar)
    settings = {k: getattr(args, k) for k in GENERATE_FIELDS}
    settings["stop"] = tuple(args.stop or ())
    cfg = lm.decode_config(**settings)
    ids = lm.encode(prompts, chat=args.chat)
    check_request(lm, ids, cfg)  # every prompt is checked before any text is printed
    mode = "ar" if cfg.ar else f"{cfg.sampler} K={cfg.draft_len} |R|={cfg.proposals}" + (
        f" tree={','.join(map(str, cfg.tree))}" if any(cfg.tree) else "")
    done = 0
    if args.json:
        try:
            for start in range(0, len(ids), batch_size):
                chunk = ids[start:start + batch_size]
                for i, g in enumerate(generate(lm, chunk, cfg)):
                    print(json.dumps({"index": start + i, "text": g.text, "token_ids": g.token_ids,
                                      "finish_reason": g.finish_reason, "stats": g.stats.as_dict()}), flush=True)
                done += len(chunk)
        except KeyboardInterrupt:  # main turns it into the exit code
            print(f"\n[interrupted] {done} of {len(ids)} prompts decoded and printed", file=sys.stderr, flush=True)
            raise
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
            raise
        print(f"\n{_stats_line(mode, out.stats)}", file=sys.stderr, flush=True)
    return 0


def _stats_line(mode: str, s) -> str:
    hist = " ".join(f"{k}:{v}" for k, v in sorted(s.accepted.items()))
    return (f"[{mode}] {s.new_tokens} tokens, {s.forwards} forwards, TPF {s.tpf:.2f}, "
            f"{s.new_tokens / max(s.wall_time, 1e-9):.1f} tok/s, {s.wall_time:.2f}s, accepted {{{hist}}}")


def cmd_demo(args) -> int:
    """stream a chat, a code and a prose answer; TPF and speedup over AR for each

    Decode three bench prompts (chat, code, prose) with MODEL, streaming the text, then decode each with the same-
    stack AR loop in the same run and print tokens per forward, both speeds, the speedup and whether the text
    equals AR's."""
    lm = _load(args)
    settings = given(args, DEMO_FIELDS)
    prompts = demo_prompts()
    if not _has_chat_template(lm):
        prompts = [(label, text, False) for label, text, _ in prompts]
        print(f"demo: {args.model} has no chat template: the requests are given as plain text", file=sys.stderr)
    rows = run_demo(lm, prompts, **settings)
    if args.json:
        print(json.dumps(rows))
    return 0


def cmd_doctor(args) -> int:
    """check that decoding is exact on this machine: each part of the forward, row by row

    Run the batch-invariance property on this machine, in this dtype, on MODEL: a step's rows (verify rows; mask
    slots with the drafting adapter) against the same rows alone or with more rows after them, comparing the bits of
    each part (linears, attention, norms, adapter, head) and of the whole forward (logits, K/V). Prints a verdict per
    part and the machine line; the verdict is cached per machine (as the cost table is), and --recheck runs it
    anew. Exit code 0 when exact, 1 when a part differs."""
    lm = DiffusionLM.from_pretrained(args.model, dtype=_dtype(args), batch_invariant=True)
    from .model import exactness  # the check itself; every verb that loads a model consults its cached verdict
    verdict = exactness.verdict(lm) if not args.recheck else exactness.check(lm)
    if args.recheck:
        exactness.save(lm, verdict)
    width = max(len(c) for c in verdict.components)
    for name, ok in verdict.components.items():
        state = "bitwise row-invariant" if ok else "DIFFERS" if ok is False else "not exercised by this model"
        print(f"  {name:<{width}}  {state}")
    print(verdict.line())
    if args.json:
        print(json.dumps({"exact": verdict.exact, **verdict.as_saved()}))
    return 0 if verdict.exact else 1


def _has_chat_template(lm) -> bool:
    return bool(getattr(lm.tokenizer, "chat_template", None))


def cmd_train(args, overrides: list[str]) -> int:
    """train a drafting model from a YAML recipe (accelerate-ready)

    Train with the TiDAR objective. Any config field can be overridden as --section.field VALUE (e.g. --optim.lr
    1e-4 --schedule.max_steps 200). Multi-process: accelerate launch --config_file recipes/accelerate/ddp.yaml
    -m ar2dlm train --config ..."""
    return main_train(args.config, overrides, args.resume)


def cmd_distill(args) -> int:
    """write the model's own AR continuations of prompts as training data

    Greedy (or sampled) AR continuations of every prompt, batched, resumable: writes OUT/distilled.jsonl with token
    ids (prompt_ids, completion_ids)."""
    cfg = config_from(args, DistillConfig)  # settings fail before the model loads
    _check_out_dir(args.out)
    read_prompt_file(args.prompts)
    # the teacher is the AR model: a bundled name means its base, not the shipped drafter
    model = resolve_base(args.model) if args.model in BUNDLED else args.model
    lm = DiffusionLM.from_pretrained(model, allow_ar=True)
    print(distill(lm, args.prompts, args.out, cfg))
    return 0


def _check_out_dir(out) -> None:
    check(out is None or not Path(out).exists() or Path(out).is_dir(), f"--out {out} is a file, not a directory", "out")


def cmd_merge(args) -> int:
    """merge an ungated LoRA adapter into a full converted checkpoint"""
    print(merge(args.adapter, args.out, force=args.force))
    return 0


def cmd_export(args) -> int:
    """a compact copy of an adapter folder (weights in bf16, no tokenizer)

    Copy ADAPTER (a run's final/) into OUT with its weights cast to --dtype and without tokenizer files (rebuilt
    from the base model on load). This is how the bundled smollm2-135m drafter is made."""
    out = export(args.adapter, args.out, dtype=args.dtype, force=args.force)
    size = sum(f.stat().st_size for f in out.iterdir())
    print(f"{out} ({size / 2**20:.1f} MiB)")
    return 0


def cmd_plot(args) -> int:
    """PNG curves of a run's metrics.jsonl"""
    for path in plot_run(args.run_dir):
        print(path)
    return 0


def cmd_prompts(args) -> int:
    """write the offline prompt sets (train.jsonl, bench.jsonl)"""
    for split, path in write_prompt_sets(args.out, force=args.force).items():
        print(f"{split}: {path}")
    return 0


def _dtype(args) -> str:
    return config_from(args, LoadConfig).dtype


def _load(args, **kwargs) -> DiffusionLM:
    """The verb's model, in its --dtype; says on stderr what it computes in and on (speed belongs to a machine)."""
    lm = DiffusionLM.from_pretrained(args.model, dtype=_dtype(args), **kwargs)
    print(f"{args.verb}: {args.model}, {describe(lm.model.dtype)}{', batch-invariant' * lm.batch_invariant}",
          file=sys.stderr)
    print(f"{args.verb}: {lm.paths()}", file=sys.stderr)
    print(f"{args.verb}: {_verdict_line(lm)}", file=sys.stderr)
    return lm


def _verdict_line(lm) -> str:
    """The machine check's line (model/exactness.py), or what float32 promises instead."""
    verdict = lm.exactness()
    if verdict is None:
        return ("exactness: batch invariance off (float32): greedy agrees with HF generate at the argmax; "
                "use --dtype bfloat16 for the bitwise contract")
    return verdict.line()


def _verdict_record(lm) -> dict | None:
    verdict = lm.exactness()
    return None if verdict is None else {"exact": verdict.exact, **verdict.as_saved()}


def _plain_vocab(lm) -> dict:
    """The tokenizer's vocabulary without the mask token (which only converted models have)."""
    return {t: i for t, i in lm.tokenizer.get_vocab().items() if i != lm.mask_token_id}


def cmd_bench(args) -> int:
    """tokens/s and TPF against the same-stack AR loop and HF generate

    Measure, in one process and interleaved run by run, the same-stack AR loop, HF generate, HF prompt-lookup
    decoding and ar2dlm's samplers over draft lengths and proposal counts, on bench prompts never used in
    training. Prints a table; the last stdout line is JSON; plots and bench.json go to --out."""
    cfg = config_from(args, BenchConfig)
    out = Path(args.out or f"runs/bench-{time.strftime('%Y%m%d-%H%M%S')}")
    _check_out_dir(out)
    inputs = [resolve_model(m) for m in (args.model, args.reference) if m] + [s for s in cfg.sets if Path(s).exists()]
    for name in ("bench.json", *bench.PLOT_FILES):  # before minutes of timing, not after
        files.check_output_file(out / name, args.force, inputs=inputs)
    lm = _load(args)
    lm.name = args.model
    cfg = cfg.resolved(*lm.settings.decode_defaults())
    cfg = without_chat(cfg, _has_chat_template(lm), args.model, explicit=args.sets is not None)
    reference = None
    if args.reference:
        reference = DiffusionLM.from_pretrained(args.reference, dtype=_dtype(args), allow_ar=True)
        reference.name = args.reference
        if _plain_vocab(reference) != _plain_vocab(lm):
            raise ConfigError(f"--reference {args.reference} has another tokenizer than {args.model}: outputs can "
                              "only be compared token by token with the same vocabulary", field="reference")
    prompt_sets = {name: bench.load_prompt_set(lm, name, cfg.n_prompts) for name in cfg.sets}  # fail before timing
    opts = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()
            if k not in ("quick", "seed", "prompt_lengths")}
    report = bench.bench(lm, seed=cfg.seed, reference=reference, log=print, prompt_sets=prompt_sets, **opts)
    report["machine"] = {**machine(lm.model.dtype), "batch_invariant": lm.batch_invariant, "paths": lm.paths(),
                          "exactness": _verdict_record(lm)}
    if cfg.prompt_lengths:
        report["context_scaling"] = bench.context_scaling(lm, list(cfg.prompt_lengths), cfg.max_new_tokens, cfg.runs,
                                                      log=print)
    report["settings"] = opts
    files.write_text(out / "bench.json", json.dumps(report, indent=1), force=args.force, inputs=inputs)
    report["plots"] = [str(p) for p in bench.plots(report, out)]
    print(bench.table(report))
    print(f"(median tokens/s of {cfg.runs} runs after a warm-up; speedup = ratio to the same-stack AR loop "
          f"measured in the same run; {report['threads']} threads) -> {out}")
    print(json.dumps(report))
    return 0


def cmd_tune(args) -> int:
    """choose draft_len and proposals for this machine; write them as defaults

    Measure the forward cost by number of token slots and the acceptance on a prompt set, predict tokens/s for draft
    length x proposals, time the best predictions against the AR loop, and write the fastest into the model's
    ar2dlm.json."""
    cfg = config_from(args, TuneConfig)
    lm = _load(args)
    cfg = without_chat(cfg, _has_chat_template(lm), args.model, explicit=args.sets is not None)
    prompts = [p for s in cfg.sets for p in bench.load_prompt_set(lm, s, cfg.n_prompts)]
    result = tune.tune(lm, prompts, max_len=cfg.max_draft_len, max_new_tokens=cfg.max_new_tokens)
    result["machine"] = {**machine(lm.model.dtype), "batch_invariant": lm.batch_invariant, "paths": lm.paths(),
                          "exactness": _verdict_record(lm)}
    print(tune.format_tune(result))
    best = result["best"]
    if cfg.grid:
        result["grid_search"] = tune.grid_search(lm, prompts, best, max_new_tokens=cfg.max_new_tokens)
        print(tune.format_grid(result["grid_search"], best))
    if not cfg.dry_run:
        tune.write_defaults(lm.source, result)
        print(f"wrote draft_len={best['draft_len']} proposals={best['proposals']} "
              f"adaptive={bool(best.get('adaptive'))} and the forward-cost table "
              f"to {lm.source / 'ar2dlm.json'}")
    print(json.dumps(result))
    return 0


def cmd_eval(args) -> int:
    """task quality (HumanEval in a sandbox, IFEval-style rules) of decoding settings, with TPF, tau and speedup over
    AR

    Decode a task's problems with each setting (ar, greedy, ar-sample, lossless, mix:W), score the answers (code in
    a bubblewrap sandbox, refused where there is none unless --unsandboxed), and print score with 95% CI,
    TPF, tau, tokens/s and speedup over the AR loop of the same run. OUT/results.jsonl grows as answers are
    scored; a rerun resumes. --frontier sweeps ar, ar-sample, greedy, lossless and mix weights and draws
    OUT/frontier.png."""
    if args.lm_eval:
        raise ConfigError("--lm-eval must come right after `eval`: ar2dlm eval --lm-eval --model ar2dlm "
                          "--model_args pretrained=MODEL ... (the rest is lm-eval's command line)", field="lm_eval")
    cfg = config_from(args, EvalConfig)  # settings fail before the model loads
    if cfg.task == "humaneval":  # so does a machine with nothing to contain model-written code
        print(f"sandbox: {sandbox.require_isolation(cfg.unsandboxed)}")
    out = Path(args.out or f"runs/eval-{cfg.task}-{cfg.form}")
    _check_out_dir(out)
    ar_only = not cfg.frontier and all(s in ("ar", "ar-sample") for s in cfg.settings)  # a base model is fine
    files.check_not_input(out, [resolve_model(args.model)], "output folder", replaces=False)
    lm = _load(args, allow_ar=ar_only)
    summary = eval_run.evaluate(lm, cfg, out, args.model, force=args.force, progress=not args.no_progress)
    summary["machine"] = {**machine(lm.model.dtype), "batch_invariant": lm.batch_invariant, "paths": lm.paths(),
                          "exactness": _verdict_record(lm)}
    print(f"{cfg.task} ({cfg.form} form), {summary['problems']} problems, {summary['wall_seconds']:.0f}s -> {out}")
    print(eval_run.table(summary["settings"]))
    print(json.dumps(summary))
    return 0


def cmd_plan(args) -> int:
    """predict proposals per forward and the best K, |R| for an accelerator (roofline; no weights needed)

    From a model config and an accelerator's peak bandwidth and FLOP/s, predict the cost of a forward by token slots
    (weights, MoE experts touched, KV and conv state, FLOPs with attention), the proposals that fit for free,
    and the best draft length and proposal count for given acceptance rates. The last stdout line is JSON."""
    cfg = config_from(args, PlanConfig)
    shape = plan.model_shape(plan.load_config(args.model))
    result = plan.plan(shape, plan.hardware(cfg.hardware, cfg.dtype), cfg)
    print(plan.format_plan(result, plan.SEED_FIGURES if args.model == "zaya1-8b" else None))
    if args.measure:
        result["measured"] = plan.measured_vs_predicted(args.model, shape, plan.Hardware(**result["hardware"]), cfg)
        print(plan.format_measured(result["measured"]))
    print(json.dumps(result))
    return 0
