"""Shipping a drafter: `ar2dlm export` (bf16, no tokenizer), bundled-name resolution to a local copy that
`tune` may rewrite, and `ar2dlm demo` (text == AR, TPF and speedup measured per prompt)."""

from __future__ import annotations

import io
import json

import pytest
import torch
from conftest import EOS, save_base
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from ar2dlm.cli import main
from ar2dlm.measure.demo import run_demo
from ar2dlm.model import bundled
from ar2dlm.model.lm import DiffusionLM
from ar2dlm.model.settings import DiffusionConfig
from ar2dlm.nn.lora import AdapterLinear, TokenRows
from ar2dlm.train import objective
from ar2dlm.train import trainer as T
from ar2dlm.train.config import TrainConfig


@pytest.fixture(scope="module")
def final(tmp_path_factory):
    """A drafting adapter folder (a run's final/) trained a few steps on a repeating corpus (tied embeddings)."""
    root = tmp_path_factory.mktemp("export")
    save_base("llama", root / "base")
    tied = AutoModelForCausalLM.from_pretrained(root / "base")  # tied like SmolLM2: the mask row also
    tied.config.tie_word_embeddings = True  # lives in the LM head
    tied.get_output_embeddings().weight = tied.get_input_embeddings().weight
    tied.save_pretrained(root / "base")
    reloaded = AutoModelForCausalLM.from_pretrained(root / "base")
    assert reloaded.get_output_embeddings().weight is reloaded.get_input_embeddings().weight
    with open(root / "data.jsonl", "w") as f:
        for i in range(60):
            f.write(json.dumps({"text": " ".join(f"w{2 + (i + j) % 7}" for j in range(40))}) + "\n")
    cfg = TrainConfig.from_dict({
        "run_dir": str(root / "run"), "model": {"path": str(root / "base"), "precision": "fp32"},
        "data": {"train": [str(root / "data.jsonl")], "seq_len": 32, "heldout_fraction": 0.0},
        "objective": {"block_size": 4}, "adapter": {"kind": "drafting", "rank": 8, "alpha": 16},
        "optim": {"lr": 5e-3, "mask_row_lr": 1e-2, "batch_size": 4},
        "schedule": {"max_steps": 30, "warmup_fraction": 0.0},
        "eval": {"every_steps": 0, "log_every": 10}, "checkpoint": {"every_steps": 1000, "every_minutes": 0}})
    T.train(cfg)
    return root / "run" / "final"


def test_export_bf16_is_small_and_keeps_the_ar_path(final, tmp_path, capsys):
    out = tmp_path / "shipped"
    assert main(["export", str(final), str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                     "ar2dlm.json"]
    full, half = load_file(final / "adapter_model.safetensors"), load_file(out / "adapter_model.safetensors")
    assert full.keys() == half.keys() and all(v.dtype == torch.bfloat16 for v in half.values())
    assert (out / "adapter_model.safetensors").stat().st_size < 0.6 * (final / "adapter_model.safetensors").stat().st_size
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        DiffusionConfig.load(final).base_model

    a = DiffusionLM.from_pretrained(final)
    b = DiffusionLM.from_pretrained(out)  # tokenizer rebuilt from the base + mask token
    assert b.mask_token_id == a.mask_token_id
    assert b.tokenizer.convert_ids_to_tokens(b.mask_token_id) == "<|mask|>"
    x = torch.tensor([[2 + j % 7 for j in range(16)]])
    batch = objective.build_batch(x, a.settings)
    with torch.no_grad():
        la = a.forward(batch.input_ids, batch.position_ids, batch.attention_mask, batch.mask_slots)
        lb = b.forward(batch.input_ids, batch.position_ids, batch.attention_mask, batch.mask_slots)
    S, V = x.shape[1], a.mask_token_id  # the mask token is the last id; its logit is never sampled
    torch.testing.assert_close(lb[:, :S, :V], la[:, :S, :V])  # clean rows: base weights, unaffected by the cast
    assert not torch.equal(lb[:, S:], la[:, S:])  # slot rows: the bf16 weights are really used ...
    torch.testing.assert_close(lb[:, S:], la[:, S:], rtol=0.05, atol=0.05)  # ... and are close to fp32
    assert (lb[:, S:].argmax(-1) == la[:, S:].argmax(-1)).float().mean() > 0.9

    base = AutoModelForCausalLM.from_pretrained(final.parent.parent / "base").eval()
    p = [2, 3, 4, 5, 6]
    hf = base.generate(torch.tensor([p]), do_sample=False, max_new_tokens=20, eos_token_id=EOS,
                       pad_token_id=0)[0, len(p):].tolist()
    assert b.generate([p], max_new_tokens=20, draft_len=4, proposals=2)[0].token_ids == hf


def test_export_errors(final, tmp_path, capsys):
    assert main(["export", str(tmp_path), str(tmp_path / "o")]) == 2
    assert "not an adapter folder" in capsys.readouterr().err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    assert main(["export", str(final), str(tmp_path / "full")]) == 2
    assert "not empty" in capsys.readouterr().err


@pytest.fixture
def shipped(final, tmp_path, monkeypatch):
    """A bundled name 'tiny' whose shipped drafter is an export of `final`; $AR2DLM_HOME is a temp dir."""
    asset = tmp_path / "assets" / "tiny-drafter"
    main(["export", str(final), str(asset)])
    monkeypatch.setenv("AR2DLM_HOME", str(tmp_path / "home"))
    monkeypatch.setitem(bundled.BUNDLED, "tiny", {"drafter": "tiny-drafter", "drafter_subdir": "tiny"})
    monkeypatch.setattr(bundled, "drafter_asset", lambda name: asset if name == "tiny" else None)
    return asset


def test_bundled_name_loads_a_local_copy_of_the_shipped_drafter(shipped, tmp_path):
    lm = DiffusionLM.from_pretrained("tiny")
    copy = tmp_path / "home" / "tiny"
    assert lm.source == copy and lm.settings.adapter == "drafting"
    assert (copy / "adapter_model.safetensors").read_bytes() == (shipped / "adapter_model.safetensors").read_bytes()

    from ar2dlm.measure import tune as T2
    T2.write_defaults(lm.source, {"best": {"draft_len": 3, "proposals": 2}, "forward_cost": {1: 1.0, 4: 1.5},
                                  "machine_key": "a CPU | float32 | 2 threads"})
    again = DiffusionLM.from_pretrained("tiny")  # tuned defaults in the copy are kept ...
    assert (again.decode_config().draft_len, again.decode_config().proposals) == (3, 2)
    assert DiffusionConfig.load(shipped).draft_len == 0  # ... and the shipped folder is untouched

    # a newer shipped drafter replaces the copy (and its tuned defaults)
    settings = DiffusionConfig.load(shipped)
    import dataclasses
    dataclasses.replace(settings, draft_len=2, proposals=1).save(shipped)
    assert DiffusionLM.from_pretrained("tiny").decode_config().draft_len == 2


def test_demo_measures_each_prompt_against_ar(final):
    lm = DiffusionLM.from_pretrained(final)
    text = io.StringIO()
    prompts = [("pattern", "w2 w3 w4 w5 w6", False), ("other", "w9 w40 w3", False)]
    rows = run_demo(lm, prompts, max_new_tokens=16, out=text, draft_len=4, proposals=2)
    assert [r["prompt"] for r in rows] == ["pattern", "other"]
    for r in rows:
        assert r["same_as_ar"]  # greedy: the streamed text is AR's
        assert r["tpf"] == pytest.approx(r["tokens"] / r["forwards"], abs=1e-3)
        assert r["speedup"] == pytest.approx(r["tokens_per_s"] / r["ar_tokens_per_s"], rel=0.01)
    printed = text.getvalue()
    ar = lm.generate(["w2 w3 w4 w5 w6"], max_new_tokens=16, ar=True)[0].text
    assert ar in printed and "TPF" in printed and "same text as AR: yes" in printed


def test_fast_adapter_forwards_equal_peft(final):
    """lora.AdapterLinear / lora.TokenRows (the peft layers, re-typed on load): their forward == their
    `reference`, peft's own forward with the RowGate, in values and in gradients, for the adapter on and off."""
    from peft.tuners.lora import Linear as LoraLinear
    from peft.tuners.trainable_tokens.layer import TrainableTokensLayer

    lm = DiffusionLM.from_pretrained(final)
    gated = [m for m in lm.model.modules() if isinstance(m, LoraLinear)]
    tokens = [m for m in lm.model.modules() if isinstance(m, TrainableTokensLayer)]
    assert gated and all(type(m) is AdapterLinear for m in gated) and len(tokens) == 2
    assert all(type(m) is TokenRows for m in tokens)
    mask_id = lm.mask_token_id
    for p in lm.model.parameters():
        p.requires_grad_(True)

    def both(module, x, slots):
        out = []
        for fn in (module.forward, module.reference):
            lm.model.zero_grad()
            with lm.slot_gate.rows(slots):
                y = fn(x)
            if y.is_floating_point():
                (y.float() * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
            grads = [p.grad.clone() for p in module.parameters() if p.grad is not None]
            out.append((y.detach(), grads))
        return out

    slots = torch.tensor([[False, False, True, True, True]])
    for adapter_on in (True, False):
        ctx = lm.model.disable_adapter() if not adapter_on else torch.enable_grad()
        with ctx:
            for m in gated[:6]:
                x = torch.randn(1, 5, m.in_features)
                (fast, gf), (ref, gr) = both(m, x, slots)
                torch.testing.assert_close(fast, ref)
                assert len(gf) == len(gr) and all(torch.allclose(a, b, atol=1e-6) for a, b in zip(gf, gr))
            embed, head = sorted(tokens, key=lambda m: isinstance(m.base_layer, torch.nn.Linear))
            ids = torch.tensor([[3, mask_id, 5, mask_id, 2]])
            (fast, gf), (ref, gr) = both(embed, ids, slots)
            torch.testing.assert_close(fast, ref)
            assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(gf, gr))
            h = torch.randn(1, 5, head.base_layer.in_features)
            (fast, gf), (ref, gr) = both(head, h, slots)
            torch.testing.assert_close(fast, ref)
            assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(gf, gr))


def test_fused_gated_adapter_equals_peft(final):
    """In inference the gated LoRA runs fused with its base weight (kernels.py); each adapted layer equals
    peft's own forward with the RowGate, 1 to 40 rows, slots as a suffix (fused) or scattered (plain path)."""
    from peft.tuners.lora import Linear as LoraLinear

    lm = DiffusionLM.from_pretrained(final)
    gated = [m for m in lm.model.modules() if isinstance(m, LoraLinear)]
    with torch.inference_mode():
        for rows in (1, 3, 8, 40):
            for slots in (torch.arange(rows)[None] >= rows // 2, torch.arange(rows)[None] % 3 != 0):
                for m in gated[:7]:
                    x = torch.randn(1, rows, m.in_features)
                    with lm.slot_gate.rows(slots):
                        fast, ref = m.forward(x), m.reference(x)
                    torch.testing.assert_close(fast, ref)
