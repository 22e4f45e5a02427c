"""`ar2dlm plan CONFIG --hardware NAME`: proposals per forward for an accelerator, from a roofline.

No weights are needed: the model's shape comes from its config (instantiated
on the meta device), the machine's from its published peak HBM bandwidth and
dense FLOP/s (or, for `this-cpu`, a few-second micro-benchmark).

1. Cost of a forward of `batch` rows with N token slots each (T = batch * N
   tokens) over a cache of `context` tokens per row, as the roofline
   time = max(bytes / bandwidth, FLOPs / peak):
     bytes = dense weights                         (every non-expert parameter, the LM head included)
           + experts touched * bytes per expert    (per MoE layer, E (1 - (1 - k/E)^T) distinct experts
                                                     for T tokens routed top-k over E, uniform routing)
           + KV cache read                         (batch * context * layers * 2 * kv_heads * head_dim)
           + conv / delayed-value state            (ZAYA1 CCA: per row and layer)
           + new KV written                        (T * layers * 2 * kv_heads * head_dim)
     FLOPs = 2 * T * (active parameters per token + LM head)
           + attention: 4 * T * (context + N) * q_heads * head_dim per layer (QK^T and PV over the dense
             mask, the way sdpa computes it)
   Activations, norms and kernel launch overheads are not counted. On a
   CPU (`this-cpu`) the linear layers run at the FLOP/s measured for a
   streamed-weight matmul of T rows, far below the square-matmul peak at few
   rows; accelerators use their peak at every row count.
2. A decode step with draft length K and |R| proposals feeds N = K + |R| K
   slots per row. With acceptance rates a_j, `tune.predicted_tpf` gives the
   tokens per forward; speedup over AR = TPF / (cost(N) / cost(1)).
3. The knee: the largest |R| (at K = block size) whose forward costs at
   most 5% more than the verify-only forward (K slots, |R| = 0): the
   proposals that ride free. That is the sense of "about 3 block proposals
   per forward on MI300x" in Zyphra's ZAYA1 report. At batch 1 an MoE has no
   free proposals: every extra token routes to experts no other token read.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch

from ..core.errors import ConfigError
from ..core.files import ASSETS, read_json
from ..core.validation import check, check_types
from ..model import architectures
from ..model.bundled import BUNDLED, resolve_base
from ..model.lm import DiffusionLM
from . import tune

# named model configs shipped with the package (no weights)
SHIPPED = {"zaya1-8b": ASSETS / "zaya1-8b" / "config.json"}
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


@dataclasses.dataclass(frozen=True)
class Hardware:
    name: str
    bandwidth: float  # peak memory bandwidth, bytes/s
    flops: float  # peak dense FLOP/s in the plan's dtype
    source: str
    # measured FLOP/s of a weight-streaming matmul by its row count ((rows, FLOP/s), ...); () = `flops` at any
    # row count. A CPU reaches its square-matmul peak only with many rows.
    flops_by_rows: tuple = ()

    def flops_at(self, rows: int) -> float:
        """FLOP/s of the linear layers of a forward of `rows` tokens (interpolated in log rows)."""
        import math

        pts = [tuple(p) for p in self.flops_by_rows]
        if not pts:
            return self.flops
        if rows <= pts[0][0]:
            return pts[0][1]
        for (r0, f0), (r1, f1) in zip(pts, pts[1:]):
            if rows <= r1:
                w = (math.log(rows) - math.log(r0)) / (math.log(r1) - math.log(r0))
                return f0 + w * (f1 - f0)
        return pts[-1][1]


# published peak HBM bandwidth and dense (no sparsity) bf16/fp16 tensor FLOP/s of one accelerator
PUBLISHED = {
    "h100": (3.35e12, 989e12, "NVIDIA H100 SXM5: 3.35 TB/s HBM3, 989 TFLOP/s dense bf16"),
    "h200": (4.8e12, 989e12, "NVIDIA H200 SXM: 4.8 TB/s HBM3e, 989 TFLOP/s dense bf16"),
    "b200": (8.0e12, 2250e12, "NVIDIA B200 (HGX): 8 TB/s HBM3e, 2.25 PFLOP/s dense bf16"),
    "mi300x": (5.3e12, 1307e12, "AMD Instinct MI300X: 5.3 TB/s HBM3, 1307 TFLOP/s dense bf16"),
    "mi355x": (8.0e12, 2517e12, "AMD Instinct MI355X: 8 TB/s HBM3E, 2517 TFLOP/s dense bf16"),
}
FREE = 1.05  # a proposal is free while the forward costs at most 5% more than verifying the draft alone
HARDWARE_NAMES = (*PUBLISHED, "this-cpu")


@dataclasses.dataclass(frozen=True)
class PlanConfig:
    """`ar2dlm plan` settings."""

    hardware: str = "mi300x"
    """Accelerator: h100, h200, b200, mi300x, mi355x (published peaks), or this-cpu (measured)."""
    dtype: str = "bfloat16"
    """Weights, cache and arithmetic: bfloat16, float16 (GPUs and CPU), float32 (this-cpu only)."""
    batch_size: int = 1
    """Sequences decoded together (rows of a forward)."""
    context: int = 4096
    """Cached tokens per row (prompt + generated so far)."""
    block_size: int = 16
    """Longest draft length K considered (the converted model's block size)."""
    acceptance: tuple[float, ...] = (0.8,)
    """a_j = P(draft j+1 accepted | drafts up to j were), j = 1..; one value is used for every j; the last
    value repeats when fewer than block_size - 1 are given. Measure them with `ar2dlm tune`."""
    max_proposals: int = 8
    """Largest |R| considered."""

    def __post_init__(self):
        check_types(self)
        check(self.hardware in HARDWARE_NAMES, f"hardware must be one of {', '.join(HARDWARE_NAMES)}, got "
                                               f"{self.hardware!r}", "hardware")
        check(self.dtype in DTYPE_BYTES, f"dtype must be one of {', '.join(DTYPE_BYTES)}, got {self.dtype!r}", "dtype")
        check(self.dtype != "float32" or self.hardware == "this-cpu",
              f"dtype float32: the published peaks of {self.hardware} are for bf16/fp16 tensor cores; use "
              f"--dtype bfloat16, or --hardware this-cpu", "dtype")
        check(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}", "batch_size")
        check(self.context >= 1, f"context must be >= 1 cached token, got {self.context}", "context")
        check(1 <= self.block_size <= 64, f"block_size must be in 1..64, got {self.block_size}", "block_size")
        check(len(self.acceptance) >= 1 and all(0.0 <= a <= 1.0 for a in self.acceptance),
              f"acceptance must be one or more rates in [0, 1], got {self.acceptance}", "acceptance")
        check(self.max_proposals >= 1, f"max_proposals must be >= 1, got {self.max_proposals}", "max_proposals")

    def rates(self) -> list[float]:
        a = list(self.acceptance)
        return (a + [a[-1]] * 64)[:max(self.block_size - 1, 1)]


@dataclasses.dataclass(frozen=True)
class Shape:
    """What the roofline needs of a model, read off a meta-device instance of its config."""

    model_type: str
    layers: int
    q_heads: int
    kv_heads: int
    head_dim: int
    dense_params: int  # every parameter outside the experts and the input embedding (LM head included)
    lm_head_params: int
    experts: int  # routed experts per MoE layer (0 = dense)
    top_k: int
    moe_layers: int
    expert_params: int  # parameters of one routed expert
    state_per_row: int  # conv / delayed-value state elements per row (all layers)
    context: int = 0  # the model's context (max_position_embeddings); 0 = not given

    @property
    def total_params(self) -> int:
        return self.dense_params + self.moe_layers * self.experts * self.expert_params

    @property
    def active_params(self) -> int:
        """Parameters one token multiplies with (excluding the LM head)."""
        return self.dense_params - self.lm_head_params + self.moe_layers * self.top_k * self.expert_params


def load_config(model: str):
    """An HF config from a config.json, a checkpoint directory, a shipped name (zaya1-8b) or a bundled name."""
    from transformers import AutoConfig

    if model in SHIPPED:
        path = SHIPPED[model]
    else:
        path = Path(model)
        if not path.exists():
            if model not in BUNDLED:
                raise ConfigError(f"{model}: no such config.json or checkpoint directory, and not a known name "
                                  f"({', '.join([*SHIPPED, *BUNDLED])})")
            path = resolve_base(model)
        if path.is_dir():
            path = path / "config.json"
    if not path.is_file():
        raise ConfigError(f"{path}: no config.json there")
    raw = read_json(path, "model config")
    _check_sizes(raw if isinstance(raw, dict) else {}, str(path))  # before transformers divides by them
    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError, TypeError, ArithmeticError) as e:  # its own checks of sizes fail oddly
        raise ConfigError(f"{path}: not a usable transformers model config "
                          f"({(str(e).splitlines() or [type(e).__name__])[0]})") from e


SIZES = ("num_hidden_layers", "hidden_size", "num_attention_heads", "vocab_size", "max_position_embeddings")


def _check_sizes(raw: dict, where: str, required=()) -> None:
    for key in SIZES:
        value = raw.get(key)
        if (value is not None or key in required) and (type(value) is not int or value < 1):
            raise ConfigError(f"{where}: {key} must be a whole number >= 1, got {value!r}; a model of that shape "
                              f"cannot be planned", field=key)


def check_config(config) -> None:
    """What `convert` checks of a config (a causal LM whose layers ar2dlm decodes exactly), and no degenerate
    size: a plan of a model ar2dlm refuses, or of zero layers, would be a confident number about nothing."""
    where = str(getattr(config, "_name_or_path", "") or config.model_type)
    architectures.check_architecture(config, where)
    text = config.get_text_config(decoder=True)
    _check_sizes({k: getattr(text, k, None) for k in SIZES}, where, required=SIZES[:-1])
    if text.hidden_size % text.num_attention_heads and getattr(text, "head_dim", None) is None:
        raise ConfigError(f"{where}: hidden_size {text.hidden_size} is not a multiple of num_attention_heads "
                          f"{text.num_attention_heads}", field="hidden_size")


def model_shape(config) -> Shape:
    """The Shape of a model config, checked first (`check_config`)."""
    from transformers import AutoModelForCausalLM

    check_config(config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    text = config.get_text_config(decoder=True)
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    head_params = head.weight.numel() if head is not None else embed.weight.numel()
    skip = {id(embed.weight)} - ({id(head.weight)} if head is not None else set())
    experts, moe_layers, expert_params, top_k = 0, 0, 0, 0
    dense = 0
    for name, p in model.named_parameters(remove_duplicate=True):
        if id(p) in skip:  # an untied input embedding is a lookup of T rows (a tied one is the LM head)
            continue
        if ".experts." in name or name.endswith(".experts"):
            continue
        dense += p.numel()
    for module in model.modules():
        if type(module).__name__.endswith("Experts") or (hasattr(module, "gate_up_proj") and
                                                         hasattr(module, "down_proj") and
                                                         getattr(module, "num_experts", None)):
            n = getattr(module, "num_experts", None) or getattr(text, "num_experts", None) or \
                getattr(text, "num_local_experts", None)
            moe_layers += 1
            experts = int(n)
            expert_params = sum(p.numel() for p in module.parameters()) // experts
    if moe_layers:
        top_k = int(getattr(text, "num_experts_per_tok", None) or getattr(text, "top_k", 1))
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    state = 0
    if getattr(text, "cca_time0", None) is not None:  # ZAYA1 CCA: q/k conv state + the delayed value projection
        width = (heads + kv_heads) * head_dim
        state = text.num_hidden_layers * (width * (text.cca_time0 - 1 + text.cca_time1 - 1) + kv_heads * head_dim // 2)
    return Shape(config.model_type, text.num_hidden_layers, heads, kv_heads, head_dim, dense, head_params, experts,
                 top_k, moe_layers, expert_params, state, getattr(text, "max_position_embeddings", None) or 0)


def experts_touched(E: int, k: int, tokens: int) -> float:
    """Expected distinct experts of one layer that `tokens` tokens routed top-k (uniformly) select."""
    return E * (1 - (1 - k / E) ** tokens) if E else 0.0


def forward_cost(shape: Shape, hw: Hardware, dtype: str, batch: int, context: int, slots: int) -> dict:
    """Roofline terms of one forward: `batch` rows of `slots` token slots over `context` cached tokens each."""
    b = DTYPE_BYTES[dtype]
    T = batch * slots
    kv_per_token = shape.layers * 2 * shape.kv_heads * shape.head_dim
    touched = experts_touched(shape.experts, shape.top_k, T)
    terms = {
        "weight_bytes": shape.dense_params * b,
        "expert_bytes": shape.moe_layers * touched * shape.expert_params * b,
        "kv_bytes": (batch * context + T) * kv_per_token * b,
        "state_bytes": batch * shape.state_per_row * b,
        "linear_flops": 2 * T * (shape.active_params + shape.lm_head_params),
        "attention_flops": 4 * T * (context + slots) * shape.q_heads * shape.head_dim * shape.layers,
        "experts_touched": touched,
    }
    bytes_ = terms["weight_bytes"] + terms["expert_bytes"] + terms["kv_bytes"] + terms["state_bytes"]
    flops = terms["linear_flops"] + terms["attention_flops"]
    compute_s = terms["linear_flops"] / hw.flops_at(T) + terms["attention_flops"] / hw.flops
    terms.update(bytes=bytes_, flops=flops, memory_s=bytes_ / hw.bandwidth, compute_s=compute_s)
    terms["seconds"] = max(terms["memory_s"], terms["compute_s"])
    return terms


def plan(shape: Shape, hw: Hardware, cfg: PlanConfig) -> dict:
    """Relative forward costs, the memory-bound knee at K = block size, and the best (K, |R|) by predicted speedup."""
    if shape.context and cfg.context + cfg.block_size > shape.context:
        raise ConfigError(f"context {cfg.context} (+ a block of {cfg.block_size}) is beyond the model's context of "
                          f"{shape.context} tokens (max_position_embeddings of {shape.model_type}): choose a context "
                          f"of at most {shape.context - cfg.block_size}", field="context")

    def cost(n):
        return forward_cost(shape, hw, cfg.dtype, cfg.batch_size, cfg.context, n)

    ar = cost(1)
    a = cfg.rates()
    K = cfg.block_size
    curve = []
    for n in range(0, cfg.max_proposals + 1):
        c = cost(K + n * K)
        curve.append({"proposals": n, "slots": K + n * K, "relative_cost": c["seconds"] / ar["seconds"],
                      "bound": "compute" if c["compute_s"] > c["memory_s"] else "memory",
                      "experts_touched": round(c["experts_touched"], 2)})
    knee = max(r["proposals"] for r in curve if r["relative_cost"] <= FREE * curve[0]["relative_cost"])
    best = []
    for k in range(2, K + 1):
        for n in range(1, min(k, cfg.max_proposals) + 1):
            tpf = tune.predicted_tpf(a, k, n)
            rel = cost(k + n * k)["seconds"] / ar["seconds"]
            best.append({"draft_len": k, "proposals": n, "slots": k + n * k, "predicted_tpf": round(tpf, 3),
                         "relative_cost": round(rel, 3), "predicted_speedup": round(tpf / rel, 3)})
    best.sort(key=lambda r: -r["predicted_speedup"])
    return {"model": shape.model_type, "hardware": dataclasses.asdict(hw), "settings": dataclasses.asdict(cfg),
            "params": shape.total_params, "active_params": shape.active_params, "ar_step": ar,
            "curve": curve, "knee_proposals": knee, "best": best[:5]}


# --------------------------------------------------------------------------------------------- this machine
def measure_cpu(dtype: str = "float32", seconds: float = 2.0) -> Hardware:
    """Peak bandwidth (a large copy) and FLOP/s (square matmuls) of this CPU with torch's current threads."""
    dt = getattr(torch, dtype)
    src = torch.ones(64 * 2**20 // 4, dtype=torch.float32)  # 64 MiB: far beyond the caches
    dst = torch.empty_like(src)
    bw = 2 * src.numel() * 4 / _best(lambda: dst.copy_(src), seconds / 2)  # read + write
    a = torch.randn(1024, 1024).to(dt)
    bm = torch.randn(1024, 1024).to(dt)
    fl = 2 * 1024 ** 3 / _best(lambda: a @ bm, seconds / 4)
    w = torch.randn(8192, 1024).to(dt)  # 32 MiB in float32: streamed from memory like a layer's weights
    by_rows = []
    for rows in (1, 2, 4, 8, 16, 32, 64, 128):
        x = torch.randn(rows, 1024).to(dt)
        # the faster of x @ W^T and (W @ x^T)^T, as ar2dlm's kernels pick per row count on a CPU
        t = min(_best(lambda: torch.nn.functional.linear(x, w), seconds / 64), _best(lambda: (w @ x.T).T, seconds / 64))
        # a T-row product can always run as T/r products of r rows, so the rate never falls with more rows:
        # a lower reading is noise (another process's load), and is lifted to the best seen at fewer rows
        by_rows.append((rows, max([2 * rows * w.numel() / t] + [f for _, f in by_rows])))
    # a one-row product streams its weight once (2 FLOPs per element): the bandwidth a forward's matmuls see,
    # often above a copy's (which also writes)
    bw = max(bw, by_rows[0][1] / 2 * w.element_size())
    return Hardware("this-cpu", bw, fl, f"measured: {bw / 1e9:.1f} GB/s, {fl / 1e9:.1f} GFLOP/s {dtype} matmul "
                    f"(streamed-weight matmul: {by_rows[0][1] / 1e9:.1f} GFLOP/s at 1 row, {by_rows[4][1] / 1e9:.1f} "
                    f"at 16), {torch.get_num_threads()} thread(s)", tuple(by_rows))


def _best(fn, budget: float) -> float:
    fn()
    times, start = [], time.perf_counter()
    while time.perf_counter() - start < budget or len(times) < 3:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def hardware(name: str, dtype: str) -> Hardware:
    if name == "this-cpu":
        return measure_cpu(dtype)
    bw, fl, source = PUBLISHED[name]
    return Hardware(name, bw, fl, source)


def measured_vs_predicted(model: str, shape: Shape, hw: Hardware, cfg: PlanConfig, slots=(1, 2, 4, 8, 16),
                          reps: int = 11) -> list:
    """`tune.forward_cost` (measured on the model's weights) next to the roofline's relative cost."""
    lm = DiffusionLM.from_pretrained(model, allow_ar=True, dtype=getattr(torch, cfg.dtype))
    measured = tune.forward_cost(lm, slots, context=cfg.context, reps=reps, batch=cfg.batch_size)
    ar = forward_cost(shape, hw, cfg.dtype, cfg.batch_size, cfg.context, 1)["seconds"]
    rows = []
    for n in slots:
        c = forward_cost(shape, hw, cfg.dtype, cfg.batch_size, cfg.context, n)
        rows.append({"slots": n, "measured": measured[n], "predicted": round(c["seconds"] / ar, 4),
                     "ratio": round(c["seconds"] / ar / measured[n], 3)})
    return rows


# Zyphra's ZAYA1-8B-Diffusion-Preview report (seeds/): block proposals per forward, bf16, 16-token blocks
SEED_FIGURES = {"mi300x": "about 3 (Zyphra)", "mi355x": "about 5 (Zyphra)"}


def format_measured(rows: list[dict]) -> str:
    lines = ["  slots  measured (tune.forward_cost)  predicted (roofline)  predicted/measured"]
    lines += [f"  {r['slots']:>5}  {r['measured']:>28.2f}  {r['predicted']:>20.2f}  {r['ratio']:>18.2f}" for r in rows]
    return "\n".join(lines)


def format_plan(result: dict, seed: dict | None = None) -> str:
    s = result["settings"]
    lines = [f"{result['model']} ({result['params'] / 1e9:.2f}B params, {result['active_params'] / 1e9:.2f}B active "
             f"per token + LM head) on {result['hardware']['name']} ({result['hardware']['source']}); {s['dtype']}, "
             f"batch {s['batch_size']}, context {s['context']}, K = {s['block_size']}",
             "  |R|  slots  cost/AR  bound    experts/layer"]
    for r in result["curve"]:
        lines.append(f"  {r['proposals']:>3}  {r['slots']:>5}  {r['relative_cost']:>7.2f}  {r['bound']:<7}  "
                     f"{r['experts_touched']:>6}")
    lines.append(f"  free proposals (cost <= {FREE:.2f}x the verify-only forward): |R| = {result['knee_proposals']} "
                 f"blocks of {s['block_size']} tokens per forward" + (f"   (seed figure: {seed[result['hardware']['name']]})" if seed and
                               result['hardware']['name'] in seed else ""))
    b = result["best"][0]
    lines.append(f"  best by predicted speedup (acceptance {list(s['acceptance'])}): K={b['draft_len']} "
                 f"|R|={b['proposals']}: TPF {b['predicted_tpf']:.2f}, cost {b['relative_cost']:.2f}x AR, "
                 f"speedup {b['predicted_speedup']:.2f}x")
    return "\n".join(lines)

