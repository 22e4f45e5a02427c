"""`ar2dlm VERB ...`: one verb = one function; flags are the fields of the verb's settings dataclass.

The verbs themselves are in cli_verbs.py; here are their parsers and the dispatch (exit codes, refusals)."""

from __future__ import annotations

import argparse
import inspect
import sys

from .cli_verbs import (DEMO_FIELDS, GENERATE_FIELDS, MODEL_DEFAULT, cmd_bench, cmd_convert, cmd_demo, cmd_distill,
                        cmd_doctor, cmd_eval, cmd_export, cmd_generate, cmd_merge, cmd_plan, cmd_plot, cmd_prompts,
                        cmd_train, cmd_tune)
from .core import interrupts
from .core.errors import ConfigError
from .core.flags import add_fields, cli_words, integer
from .decode.config import DecodeConfig
from .evaluate.config import EvalConfig
from .measure.bench_config import BenchConfig
from .measure.demo import run_demo
from .measure.plan import DTYPE_BYTES, HARDWARE_NAMES, PlanConfig
from .measure.tune_config import TuneConfig
from .model import NotConvertedError
from .model.export import export
from .model.settings import DTYPES, ConvertConfig, LoadConfig
from .serve.config import ServeConfig
from .serve.main import cmd_serve
from .train.config import DistillConfig


MODEL = "converted checkpoint, adapter folder or bundled name (smollm2-135m)"
OUT = "output directory (must not exist or be empty)"
FORCE = "replace OUT if it exists and is not empty"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ar2dlm", description="Convert an autoregressive HF causal LM into a TiDAR-style "
                                "block-diffusion LM, and decode it (one forward verifies the last draft and drafts "
                                "the next block).")
    sub = p.add_subparsers(dest="verb", required=True)

    def verb(name, fn, model=None, load=False, **kw):
        """A verb's parser; its help is fn's docstring (first paragraph: the summary); MODEL first if it takes one;
        the model-loading flags if it loads one."""
        summary, _, description = fn.__doc__.partition("\n\n")
        v = sub.add_parser(name, help=" ".join(summary.split()), description=" ".join(description.split()) or None)
        if model:
            v.add_argument("model", help=model, **kw)
        if load:
            add_fields(v, LoadConfig)
        v.set_defaults(fn=fn)
        return v

    c = verb("convert", cmd_convert)
    c.add_argument("base", help="HF checkpoint directory or bundled name (smollm2-135m)")
    c.add_argument("out", help=OUT)
    add_fields(c, ConvertConfig)
    c.add_argument("--force", action="store_true", help=FORCE)
    g = verb("generate", cmd_generate, load=True,
             model="converted checkpoint, adapter folder, or bundled name smollm2-135m (or any HF causal LM with --ar)")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="one prompt text")
    src.add_argument("--prompts", help="JSONL file: one JSON string or {\"prompt\": ...} per line")
    g.add_argument("--chat", action="store_true", help="wrap each prompt in the model's chat template")
    add_fields(g, DecodeConfig, GENERATE_FIELDS, defaults=MODEL_DEFAULT, repeat=("stop",))
    g.add_argument("--batch-size", type=integer, help="prompts decoded together (with --json only; default 1)")
    g.add_argument("--json", action="store_true", help="one JSON line per prompt instead of streamed text")
    de = verb("demo", cmd_demo, load=True, model=MODEL, nargs="?", default="smollm2-135m")
    demo_tokens = inspect.signature(run_demo).parameters["max_new_tokens"].default
    add_fields(de, DecodeConfig, DEMO_FIELDS, defaults={"max_new_tokens": demo_tokens, **MODEL_DEFAULT})
    de.add_argument("--json", action="store_true", help="also print the per-prompt numbers as one JSON line")
    dr = verb("doctor", cmd_doctor, load=True, model=MODEL, nargs="?", default="smollm2-135m")
    dr.add_argument("--recheck", action="store_true", help="run the check again instead of reading its cache")
    dr.add_argument("--json", action="store_true", help="also print the verdict as one JSON line")
    t = verb("train", cmd_train)
    t.add_argument("--config", required=True, help="recipe YAML (a serialized TrainConfig), e.g. recipes/*.yaml")
    t.add_argument("--resume", action="store_true", help="continue from the run's last checkpoint")
    t.set_defaults(takes_overrides=True)
    s = verb("distill", cmd_distill, model="checkpoint directory or bundled name (AR decoding; conversion not needed)")
    s.add_argument("--prompts", required=True, help="JSONL: {\"prompt\": text, \"id\"?, \"chat\"?} per line")
    s.add_argument("--out", required=True, help="output folder")
    add_fields(s, DistillConfig)
    m = verb("merge", cmd_merge)
    m.add_argument("adapter", help="adapter folder (a run's final/)")
    m.add_argument("out", help=OUT)
    m.add_argument("--force", action="store_true", help=FORCE)
    ex = verb("export", cmd_export)
    ex.add_argument("adapter", help="adapter folder (a run's final/)")
    ex.add_argument("out", help=OUT)
    ex.add_argument("--dtype", default=inspect.signature(export).parameters["dtype"].default,
                    choices=[d for d in DTYPES if d != "auto"])
    ex.add_argument("--force", action="store_true", help=FORCE)
    verb("plot", cmd_plot).add_argument("run_dir")
    b = verb("bench", cmd_bench, model=MODEL, load=True)
    add_fields(b, BenchConfig, defaults={"sets": None})
    b.add_argument("--reference", help="a model to compare MODEL's greedy output with (e.g. the base of an ungated "
                   "conversion): exact-match rate, common prefix, and the reference's NLL of both outputs")
    b.add_argument("--out", help="folder for bench.json and plots (default runs/bench-TIME)")
    b.add_argument("--force", action="store_true", help="replace bench.json and plots already in --out")
    tu = verb("tune", cmd_tune, load=True,
              model=MODEL + ": its ar2dlm.json is updated; for smollm2-135m the copy in $AR2DLM_HOME")
    add_fields(tu, TuneConfig, defaults={"sets": None})
    ev = verb("eval", cmd_eval, model=MODEL, load=True)
    add_fields(ev, EvalConfig)
    ev.add_argument("--lm-eval", action="store_true", help="first flag only: `ar2dlm eval --lm-eval LM_EVAL_ARGS...` "
                    "runs lm-eval's CLI with the `ar2dlm` model registered (needs the eval extra)")
    ev.add_argument("--out", help="folder for results.jsonl, summary.json, frontier.png (default runs/eval-TASK-FORM)")
    ev.add_argument("--force", action="store_true", help="discard earlier results in --out instead of resuming")
    ev.add_argument("--no-progress", action="store_true", help="no progress bar")
    pn = verb("plan", cmd_plan, model="config.json, checkpoint directory, zaya1-8b (shipped config) or smollm2-135m")
    add_fields(pn, PlanConfig, choices={"hardware": HARDWARE_NAMES, "dtype": tuple(DTYPE_BYTES)})
    pn.add_argument("--measure", action="store_true", help="also time the model's forwards by slots (tune's "
                    "forward_cost; needs its weights) next to the prediction")
    add_fields(verb("serve", cmd_serve, model=MODEL + " (any HF causal LM with --ar)", load=True), ServeConfig)
    pr = verb("prompts", cmd_prompts)
    pr.add_argument("out", help="output folder")
    pr.add_argument("--force", action="store_true", help="replace train.jsonl and bench.jsonl if OUT has them")
    return p


def refuse(verb: str, e: Exception, parser) -> int:
    """The one error line of a refused command (exit code 2); a ConfigError's `field` names the setting."""
    print(f"ar2dlm {verb}: error: {cli_words(str(e), parser)}", file=sys.stderr)
    return 2


@interrupts.exit_codes  # 130 on SIGINT, 143 on SIGTERM, after the verb saved what it saves
def main(argv: list[str] | None = None) -> int:
    raw = sys.argv[1:] if argv is None else list(argv)
    if raw[:2] == ["eval", "--lm-eval"]:  # the rest is lm-eval's own command line
        try:  # lm-eval is an optional dependency (the eval extra)
            from .evaluate.lm_eval_model import run_cli
        except ConfigError as e:
            return refuse("eval", e, None)
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
        message = str(e) if args.verb in ("generate", "serve") else \
            (f"{e.path} has no ar2dlm.json: it is an unconverted AR model; convert it first: "
             f"`ar2dlm convert {e.path} OUT_DIR`")
        return refuse(args.verb, ConfigError(message, e.field), verb_parser)
    except (ConfigError, OSError) as e:  # OSError: a file problem no loader named yet (its message names the file)
        return refuse(args.verb, e, verb_parser)


if __name__ == "__main__":
    sys.exit(main())
