"""Tiny random-initialised HF models built from configs (no downloads)."""

from __future__ import annotations

import os

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2MoeConfig,
    Qwen3Config,
)

torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
# A load that asks for no dtype (`auto`) decodes in float32 in the tests, whatever the CPU: their oracles are
# HF generate of the fp32 base. Tests of bf16 ask for it; tests of `auto` itself set or clear this.
os.environ["AR2DLM_DTYPE"] = "float32"

VOCAB = 96
EOS = 1


def make_tokenizer(vocab_size: int = VOCAB) -> PreTrainedTokenizerFast:
    """Word-level tokenizer: '<unk>' '<eos>' 'w2' 'w3' ... (text 'w5 w7' -> [5, 7])."""
    vocab = {"<unk>": 0, "<eos>": EOS, **{f"w{i}": i for i in range(2, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    from tokenizers import decoders
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>", pad_token="<unk>")


RESERVED = "<|reserved_0|>"
"""A reserved special token (id VOCAB) of `save_reserved_base`: what `--reuse-token` may take as the mask."""


def save_reserved_base(path, arch: str = "llama"):
    """A tiny base whose tokenizer has one reserved special token, RESERVED (id VOCAB), with an embedding row."""
    tok = make_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": [RESERVED]})
    tiny_model(arch, vocab=VOCAB + 1).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _common(V):
    return dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=256, eos_token_id=EOS, bos_token_id=None,
                pad_token_id=0)


ARCHS = {
    "llama": lambda V: LlamaConfig(**_common(V)),
    "qwen2": lambda V: Qwen2Config(**_common(V)),
    "qwen3": lambda V: Qwen3Config(**_common(V), head_dim=8),
    "mistral": lambda V: MistralConfig(**_common(V), sliding_window=None),
    "qwen2_moe": lambda V: Qwen2MoeConfig(**_common(V), num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                          shared_expert_intermediate_size=32, decoder_sparse_step=1),
    "gpt2": lambda V: GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=256, eos_token_id=EOS,
                                 bos_token_id=EOS, pad_token_id=0),
}
CORE_ARCHS = ["llama", "qwen2", "qwen2_moe", "gpt2"]


def tiny_model(arch: str, seed: int = 0, dtype=torch.float32, vocab: int = VOCAB):
    torch.manual_seed(seed)
    config = ARCHS[arch](vocab)
    extra = {"experts_implementation": "eager"} if "moe" in arch else {}  # grouped_mm has no float64 kernel
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", **extra).to(dtype)
    with torch.no_grad():  # random init is near-uniform; sharper logits make drafts and ties realistic
        model.get_output_embeddings().weight.mul_(8.0)
    model.generation_config.eos_token_id = EOS
    model.generation_config.pad_token_id = 0
    return model.eval()


def save_base(arch: str, path, seed: int = 0, dtype=torch.float32):
    model = tiny_model(arch, seed, dtype)
    model.save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


def distill_random_prompts(base_dir, root, n: int):
    """`ar2dlm distill` of n random 6-word prompts through the CLI (40 new tokens each): the base's own greedy
    continuations, as a drafter trains on them. Returns the distilled JSONL."""
    import json

    from ar2dlm.cli import main

    g = torch.Generator().manual_seed(1)
    with open(root / "prompts.jsonl", "w") as f:
        for i in range(n):
            words = " ".join(f"w{int(t)}" for t in torch.randint(2, 90, (6,), generator=g))
            f.write(json.dumps({"id": f"p{i}", "prompt": words}) + "\n")
    assert main(["distill", str(base_dir), "--prompts", str(root / "prompts.jsonl"), "--out",
                 str(root / "distilled"), "--max-new-tokens", "40", "--batch-size", "16"]) == 0
    return root / "distilled" / "distilled.jsonl"


@pytest.fixture(scope="session")
def base_dirs(tmp_path_factory):
    """arch -> directory of a saved tiny base checkpoint."""
    root = tmp_path_factory.mktemp("bases")
    return {arch: save_base(arch, root / arch) for arch in ARCHS}


@pytest.fixture(scope="session")
def converted_dirs(base_dirs, tmp_path_factory):
    """arch -> directory of its conversion (block size 4)."""
    from ar2dlm import convert

    root = tmp_path_factory.mktemp("converted")
    return {arch: convert(path, root / arch, block_size=4) for arch, path in base_dirs.items()}


def train_drafter(arch: str = "llama", seed: int = 0, steps: int = 150, vocab: int = VOCAB, dtype=torch.float64,
                  model=None):
    """A tiny model trained (all weights, AR + diffusion loss) on a repeating pattern, so its drafts are
    often accepted: greedy tests then exercise the accept branches, not only rejections.

    `model`: train this HF model instead of tiny_model(arch). Returns a DiffusionLM (block size 4)."""
    from ar2dlm.model.convert import add_mask_token
    from ar2dlm.model.lm import DiffusionLM
    from ar2dlm.model.settings import DiffusionConfig
    from ar2dlm.train import objective

    model = tiny_model(arch, seed, dtype, vocab) if model is None else model
    tok = make_tokenizer(vocab)
    mask_id = add_mask_token(model, tok)
    cfg = DiffusionConfig(block_size=4, mask_token_id=mask_id)
    lm = DiffusionLM(model, tok, cfg)
    g = torch.Generator().manual_seed(seed)
    pattern = torch.randperm(vocab - 2, generator=g)[:7] + 2  # a cycle of 7 distinct tokens
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        phase = torch.randint(0, 7, (8, 1), generator=g)
        x = pattern[(phase + torch.arange(32)) % 7]  # [8, 32]
        batch = objective.build_batch(x, cfg, block_offset=torch.randint(0, 4, (8,), generator=g), generator=g)
        loss, _, _ = objective.loss(lm, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    lm.pattern = pattern.tolist()
    return lm


@pytest.fixture(scope="session")
def drafter():
    return train_drafter()


class Refusal(str):
    """The one error line of a refused CLI command, and the `field` of the ConfigError behind it (or None)."""

    field: str | None = None


def run_cli(argv, capsys) -> tuple[int, str, str, list]:
    """(exit code, stdout, stderr, the errors the CLI reported) of `ar2dlm ARGV`; usage errors give SystemExit's
    code."""
    from ar2dlm import cli

    seen, real = [], cli.refuse
    capsys.readouterr()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cli, "refuse", lambda verb, e, parser: (seen.append(e), real(verb, e, parser))[1])
        try:
            rc = cli.main([str(a) for a in argv])
        except SystemExit as e:  # argparse usage errors
            rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err, seen


def refusal(err: str, verb: str, seen: list) -> Refusal:
    """The single `ar2dlm VERB: error: ...` line of err, with the reported error's field."""
    lines = [line for line in err.splitlines() if line.startswith(f"ar2dlm {verb}: error: ")]
    assert len(lines) == 1 and len(seen) == 1, err
    r = Refusal(lines[0])
    r.field = getattr(seen[0], "field", None)
    assert r.removeprefix(f"ar2dlm {verb}: error: ").strip(), "an empty error message"
    return r
