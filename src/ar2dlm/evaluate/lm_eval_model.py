"""lm-evaluation-harness model `ar2dlm` (optional extra `eval`: pip install 'ar2dlm[eval]').

    ar2dlm eval --lm-eval --model ar2dlm --model_args pretrained=DIR,sampler=greedy --tasks T [lm-eval flags]

lm-eval 0.4.13 discovers no third-party models through entry points, so `ar2dlm eval --lm-eval`
registers the model, then hands the rest of the command line to lm-eval's own CLI (any flag works).

- `loglikelihood`, `loglikelihood_rolling`: the AR path (the drafting adapter is off: the base
  model's numbers exactly), tokenized and windowed as lm-eval's `hf` model does.
- `generate_until`: the ar2dlm engine, batched (`batch_size`), with the request's stop sequences
  (plus EOS) and max_gen_toks. Greedy requests (do_sample False or temperature 0) use the greedy
  sampler (== AR greedy); sampled requests use `sampler` (lossless unless mix) at their temperature.
- model_args: pretrained (dir or bundled name), sampler, mix_weight, draft_len, proposals, ar
  (the AR loop), batch_size, max_length, dtype, stats_path. TPF, τ and tokens/s of the generation
  requests, per task, are written to stats_path (by the wrapper: beside --output_path).
- Without an --include_path of its own, the wrapper adds ar2dlm's local tasks (`local_tasks.py`):
  `ar2dlm_heldout` (held-out perplexity) and `ar2dlm_arith_mc` (multiple choice).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from ..core.errors import ConfigError

try:
    import lm_eval.models  # noqa: F401  (lm-eval's own models first: a registry with ours alone hides them)
    from lm_eval import utils as lm_utils
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
except ImportError as e:  # pragma: no cover - the extra is missing
    raise ConfigError("the lm-eval model needs lm-eval: pip install 'ar2dlm[eval]'") from e

from ..core.errors import ConfigError
from ..decode.engine import generate
from ..model.lm import DiffusionLM
from ..nn import masks
from . import local_tasks
from .run import tau

DEFAULT_MAX_LENGTH = 2048


def _bool(v) -> bool:
    return v if isinstance(v, bool) else str(v).lower() in ("1", "true", "yes")


@register_model("ar2dlm")
class Ar2dlmLM(TemplateLM):
    def __init__(self, pretrained: str = "smollm2-135m", sampler: str = "greedy", mix_weight: float = 0.0,
                 draft_len: int | None = None, proposals: int | None = None, ar: bool = False,
                 batch_size: int | str = 1, max_length: int | None = None, max_gen_toks: int = 256,
                 dtype: str = "auto", stats_path: str | None = None, device: str | None = None,
                 max_batch_size: int | None = None, **unused):
        super().__init__()
        if unused:
            raise ConfigError(f"ar2dlm lm-eval model: unknown model_args {', '.join(sorted(unused))}; known: "
                              "pretrained, sampler, mix_weight, draft_len, proposals, ar, batch_size, max_length, "
                              "max_gen_toks, dtype, stats_path")
        self.ar = _bool(ar)
        self.lm = DiffusionLM.from_pretrained(pretrained, dtype=str(dtype), allow_ar=self.ar)
        if device and str(device).startswith("cuda") and torch.cuda.is_available():  # as hf: else the CPU
            self.lm.model.to(device)
        self.tokenizer = self.lm.tokenizer
        self.sampler, self.mix_weight = sampler, float(mix_weight)
        self.drafting = {} if self.ar else {"draft_len": None if draft_len is None else int(draft_len),
                                            "proposals": None if proposals is None else int(proposals)}
        self.lm.decode_config(**self._settings(greedy=self.sampler == "greedy", temperature=1.0))  # fail now
        self.batch_size = 1 if str(batch_size).startswith("auto") else int(batch_size)
        self._max_length = int(max_length) if max_length else None
        self.max_gen_toks = int(max_gen_toks)
        self.stats_path = stats_path
        self.stats: dict[str, dict] = {}

    # ------------------------------------------------------------------ tokens (as lm-eval's hf model)
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        if self._max_length:
            return self._max_length
        from lm_eval.models.utils import resolve_max_length
        return resolve_max_length(self.lm.model.config, self.tokenizer, default=DEFAULT_MAX_LENGTH)

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        special = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        if add_special_tokens is None and self.tokenizer.bos_token and string.startswith(self.tokenizer.bos_token):
            special = {"add_special_tokens": False}
        return self.tokenizer.encode(string, **special)

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    # ------------------------------------------------------------------ AR path
    @torch.inference_mode()
    def _logprobs(self, ids: list[int]) -> torch.Tensor:
        """log p(token i+1 | tokens <= i) for every row: [len(ids), vocab] from one causal forward."""
        x = torch.tensor([ids], device=self.lm.model.device)
        q = x.shape[1]
        with self.lm.base_weights():
            logits = self.lm.forward(x, torch.arange(q, device=x.device)[None], masks.causal_mask(q, 1, x.device),
                                     torch.zeros(1, q, dtype=torch.bool, device=x.device))
        logits = logits[0].float() if logits.dtype != torch.float64 else logits[0]
        if self.lm.mask_token_id is not None:  # the AR model never predicts the mask token: its base has no such row
            logits[:, self.lm.mask_token_id] = -float("inf")
        return torch.log_softmax(logits, -1)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        out = []
        for _key, context_enc, continuation_enc in requests:
            whole = (context_enc + continuation_enc)[-(self.max_length + 1):]
            n = len(continuation_enc)
            lp = self._logprobs(whole[:-1])[-n:]  # [n, vocab]: the rows that predict the continuation
            cont = torch.tensor(continuation_enc, device=lp.device)
            out.append((float(lp.gather(1, cont[:, None]).sum()), bool((lp.argmax(-1) == cont).all())))
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        results = []
        for (string,) in [r.args for r in requests]:
            windows = map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                token_list=self.tok_encode(string), prefix_token=self.prefix_token_id, max_seq_len=self.max_length,
                context_len=1))
            results.append(sum(ll for ll, _ in self._loglikelihood_tokens([(None, *w) for w in windows])))
        return results

    # ------------------------------------------------------------------ engine path
    def _settings(self, greedy: bool, temperature: float, top_p: float = 1.0, top_k: int = 0) -> dict:
        if self.ar:
            return {"ar": True} if greedy else {"ar": True, "sampler": "lossless", "temperature": temperature,
                                                 "top_p": top_p, "top_k": top_k}
        if greedy:
            return {"sampler": "greedy", **self.drafting}
        sampler = self.sampler if self.sampler != "greedy" else "lossless"
        mix = {"mix_weight": self.mix_weight} if sampler == "mix" else {}
        return {"sampler": sampler, "temperature": temperature, "top_p": top_p, "top_k": top_k, **mix,
                **self.drafting}

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        eos = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        results: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(json.dumps(r.args[1], sort_keys=True, default=str), []).append(i)
        for idxs in groups.values():
            kw = dict(requests[idxs[0]].args[1])
            until = kw.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            if eos and eos not in until:
                until.append(eos)
            max_gen = int(kw.pop("max_gen_toks", kw.pop("max_new_tokens", self.max_gen_toks)))
            temperature = float(kw.get("temperature", 0.0) or 0.0)
            greedy = not _bool(kw.get("do_sample", False)) or temperature == 0.0
            cfg = self.lm.decode_config(max_new_tokens=max_gen, stop=tuple(s for s in until if s),
                                        seed=None if greedy else int(kw.get("seed", 1234)),
                                        **self._settings(greedy, temperature, float(kw.get("top_p", 1.0)),
                                                         int(kw.get("top_k", 0) or 0)))
            for b0 in range(0, len(idxs), self.batch_size):
                batch = idxs[b0:b0 + self.batch_size]
                ids = [self.tok_encode(requests[i].args[0])[-(self.max_length - max_gen):] for i in batch]
                t0 = time.perf_counter()
                gens = generate(self.lm, ids, cfg)
                seconds = time.perf_counter() - t0
                for i, g in zip(batch, gens):
                    text = g.text
                    for term in until:  # as lm-eval cuts hf's output: at the first stop sequence
                        if term:
                            text = text.split(term)[0]
                    results[i] = text
                    self._account(getattr(requests[i], "task_name", None) or "task", g, seconds / len(batch))
        self._write_stats()
        return results

    def _account(self, task: str, g, seconds: float) -> None:
        s = self.stats.setdefault(task, {"requests": 0, "new_tokens": 0, "forwards": 0, "seconds": 0.0,
                                         "accepted": {}})
        s["requests"] += 1
        s["new_tokens"] += g.stats.new_tokens
        s["forwards"] += g.stats.forwards
        s["seconds"] += seconds
        for r, v in g.stats.accepted.items():
            s["accepted"][str(r)] = s["accepted"].get(str(r), 0) + v

    def summary(self) -> dict:
        return {task: {"requests": s["requests"], "tpf": s["new_tokens"] / max(s["forwards"], 1),
                       "tau": tau([s["accepted"]]), "tokens_per_s": s["new_tokens"] / s["seconds"] if s["seconds"]
                       else None, "new_tokens": s["new_tokens"]} for task, s in self.stats.items()}

    def _write_stats(self) -> None:
        if self.stats_path:
            Path(self.stats_path).parent.mkdir(parents=True, exist_ok=True)
            Path(self.stats_path).write_text(json.dumps(self.summary(), indent=1))


def cli_argv(argv: list[str]) -> list[str]:
    """lm-eval's command line as the wrapper runs it: ar2dlm's local tasks on the include path (unless the
    command line names its own) and the ar2dlm model's stats beside --output_path."""
    argv = list(argv)
    if "--include_path" not in argv and not any(a.startswith("--include_path=") for a in argv):
        # ar2dlm's own local tasks (ar2dlm_heldout, ar2dlm_arith_mc)
        argv += ["--include_path", str(local_tasks.write(local_tasks.default_folder()))]
    if "--output_path" in argv and "--model_args" in argv and "ar2dlm" in argv:
        i = argv.index("--model_args") + 1
        out = Path(argv[argv.index("--output_path") + 1])
        folder = out if not out.suffix else out.parent
        if "stats_path=" not in argv[i]:
            argv[i] += f",stats_path={folder / 'ar2dlm_stats.json'}"
    return argv


def run_cli(argv: list[str]) -> int:
    """`lm-eval ARGV` with the `ar2dlm` model registered; TPF/τ/tokens/s go beside --output_path."""
    from lm_eval.__main__ import cli_evaluate

    saved = sys.argv
    sys.argv = ["lm-eval", *cli_argv(argv)]
    try:
        cli_evaluate()
    except SystemExit as e:
        return int(e.code or 0) if not isinstance(e.code, str) else 1
    finally:
        sys.argv = saved
    return 0
