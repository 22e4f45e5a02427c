"""Training: losses fall, the right parameters move, the drafting adapter keeps the AR path exact,
resume is exact across a real signal, 2 processes == 1 process with accumulation, data formats."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import EOS, distill_random_prompts, save_base
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from ar2dlm.core.errors import ConfigError
from ar2dlm.model.lm import DiffusionLM
from ar2dlm.nn import masks
from ar2dlm.train import objective, trainer
from ar2dlm.train.checkpoints import latest_checkpoint
from ar2dlm.train.config import TrainConfig
from ar2dlm.train.heldout import estimated_tpf, heldout_metrics

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A tiny base model and a repetitive JSONL corpus it can learn quickly."""
    root = tmp_path_factory.mktemp("train")
    save_base("llama", root / "base")
    g = torch.Generator().manual_seed(0)
    pattern = (torch.randperm(90, generator=g)[:7] + 2).tolist()
    with open(root / "data.jsonl", "w") as f:
        for i in range(120):
            f.write(json.dumps({"text": " ".join(f"w{pattern[(i + j) % 7]}" for j in range(40))}) + "\n")
    return root


def config(corpus, run, kind="drafting", **sections):
    raw = {"run_dir": str(corpus / run), "model": {"path": str(corpus / "base"), "precision": "fp32"},
           "data": {"train": [str(corpus / "data.jsonl")], "seq_len": 32, "heldout_fraction": 0.1},
           "objective": {"block_size": 4}, "adapter": {"kind": kind, "rank": 8, "alpha": 16},
           "optim": {"lr": 5e-3, "mask_row_lr": 1e-2, "batch_size": 4},
           "schedule": {"max_steps": 12, "warmup_fraction": 0.0},
           "eval": {"every_steps": 0, "log_every": 1}, "checkpoint": {"every_steps": 1000, "every_minutes": 0}}
    for k, v in sections.items():
        raw.setdefault(k, {}).update(v) if isinstance(v, dict) else raw.__setitem__(k, v)
    return TrainConfig.from_dict(raw)


def metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("kind", ["drafting", "lora", "full"])
def test_steps_lower_losses_and_move_only_trainable_parameters(corpus, kind):
    run = trainer.setup(config(corpus, f"fit-{kind}", kind))
    batch, _ = trainer.make_batch(run, list(range(4)))
    params = dict(run.lm.model.named_parameters())
    before = {n: p.detach().clone() for n, p in params.items()}
    first = {k: float(v.detach()) for k, v in trainer.micro_batch(run, batch).items()}
    for _ in range(8):
        out = trainer.micro_batch(run, batch)
        out["loss"].backward()
        run.optimizer.step()
        run.optimizer.zero_grad()
    last = {k: float(v.detach()) for k, v in trainer.micro_batch(run, batch).items()}
    assert last["diff_loss"] < first["diff_loss"]
    if kind != "drafting":
        assert last["ar_loss"] < first["ar_loss"]
    for n, p in params.items():
        moved = not torch.equal(before[n], p.detach())
        assert moved == p.requires_grad, n  # every trainable parameter moved; frozen ones did not
    if kind != "full":
        assert any(p.requires_grad for n, p in params.items() if "trainable_tokens_delta" in n)


@pytest.fixture(scope="module")
def distilled(corpus):
    """The tiny base model's own greedy continuations of 60 prompts (through the CLI)."""
    return distill_random_prompts(corpus / "base", corpus, 60)


def test_distill_matches_ar_greedy_and_resumes(corpus, distilled, tmp_path):
    from ar2dlm.cli import main

    records = [json.loads(line) for line in distilled.read_text().splitlines()]
    assert len(records) == 60 and len({r["id"] for r in records}) == 60
    base = AutoModelForCausalLM.from_pretrained(corpus / "base").eval()
    for r in records[:5]:
        hf = base.generate(torch.tensor([r["prompt_ids"]]), do_sample=False, max_new_tokens=40, eos_token_id=EOS,
                           pad_token_id=0)[0, len(r["prompt_ids"]):].tolist()
        assert r["completion_ids"] == hf
    # resumable: a partial file (cut mid-line) is completed without duplicates
    out = tmp_path / "again"
    out.mkdir()
    text = distilled.read_text()
    (out / "distilled.jsonl").write_text(text[: len(text) // 3])
    assert main(["distill", str(corpus / "base"), "--prompts", str(corpus / "prompts.jsonl"), "--out", str(out),
                 "--max-new-tokens", "40", "--batch-size", "16"]) == 0
    again = [json.loads(line) for line in (out / "distilled.jsonl").read_text().splitlines()]
    assert sorted(r["id"] for r in again) == sorted(r["id"] for r in records)
    by_id = {r["id"]: r["completion_ids"] for r in records}
    assert all(by_id[r["id"]] == r["completion_ids"] for r in again)


def test_drafting_loss_selected_slots_equal_all_slots_and_doubled_forward(corpus, distilled):
    """Running only the slots targets can see gives the loss of every slot, and of the doubled forward."""
    cfg = config(corpus, "select", "drafting", data={"train": [str(distilled)], "seq_len": 48})
    run = trainer.setup(cfg)
    with torch.no_grad():
        for p in run.lm.model.parameters():  # a non-zero adapter
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    batch, loss_mask = trainer.make_batch(run, list(range(4)))
    assert (~loss_mask).any() and loss_mask.any()  # prompts carry no targets
    with torch.no_grad():
        sel, sel_logits, idx = trainer.drafting_loss(run.lm, batch, select=True)
        every, all_logits, _ = trainer.drafting_loss(run.lm, batch, select=False)
        _, _, doubled = objective.loss(run.lm, batch)
    assert idx.shape[1] < loss_mask.shape[1]  # fewer slots ran
    torch.testing.assert_close(sel, every)
    torch.testing.assert_close(every, doubled)
    S = loss_mask.shape[1]
    target = batch.labels[:, S:] != -100
    for row in range(4):
        for j, i in enumerate(idx[row].tolist()):
            if target[row, i]:
                torch.testing.assert_close(sel_logits[row, j], all_logits[row, i])


@pytest.mark.parametrize("kind", ["drafting", "lora"])
def test_slot_decay_weights_each_slot_by_its_place_in_its_block(corpus, distilled, kind):
    """objective.slot_decay d: the diffusion loss is sum d**i CE / sum d**i over the target slots, i = the slot's
    index in its block (found here from the block ids), for the selected slots, every slot and the doubled forward."""
    d, B = 0.5, 4
    cfg = config(corpus, f"decay-{kind}", kind, data={"train": [str(distilled)], "seq_len": 48},
                 objective={"block_size": B, "slot_decay": d})
    run = trainer.setup(cfg)
    with torch.no_grad():
        for p in run.lm.model.parameters():  # a non-zero adapter
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    rows, offsets = run.train_rows, torch.tensor([0, 1, 2, 3])
    batch = objective.build_batch(rows.tokens[:4], run.lm.settings, rows.doc_ids[:4], rows.loss_mask[:4], offsets)
    S = batch.labels.shape[1] // 2
    blocks = masks.block_ids(S, B, offsets)  # [4, S]
    with torch.no_grad():
        _, _, plain = objective.loss(run.lm, batch)
        _, _, doubled = objective.loss(run.lm, batch, slot_decay=d)
        logits = run.lm.forward(batch.input_ids, batch.position_ids, batch.attention_mask, batch.mask_slots)[:, S:]
        if kind == "drafting":
            sel, _, _ = trainer.drafting_loss(run.lm, batch, select=True, slot_decay=d)
            every, _, _ = trainer.drafting_loss(run.lm, batch, select=False, slot_decay=d)
        got = trainer.micro_batch(run, batch)["diff_loss"]
    num = den = 0.0
    for row in range(4):
        for i in range(S):
            label = int(batch.labels[row, S + i])
            if label != objective.IGNORE:
                w = d ** (i - int((blocks[row] == blocks[row, i]).nonzero()[0]))  # slots before it in its block
                num += w * float(torch.nn.functional.cross_entropy(logits[row, i].float(), torch.tensor(label)))
                den += w
    expected = torch.tensor(num / den)
    assert not torch.isclose(plain, expected, rtol=1e-3)  # the weights change the loss
    torch.testing.assert_close(doubled.float(), expected, rtol=1e-4, atol=1e-5)
    if kind == "drafting":
        torch.testing.assert_close(sel.float(), expected, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(every.float(), expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got.float(), expected, rtol=1e-4, atol=1e-5)


def test_drafting_adapter_keeps_the_ar_path_exact(corpus, distilled):
    # an explicit held-out file: the same split on every machine (hashed keys include the temp path)
    lines = distilled.read_text().splitlines(keepends=True)
    (corpus / "train.distilled.jsonl").write_text("".join(lines[:45]))
    (corpus / "heldout.distilled.jsonl").write_text("".join(lines[45:]))
    cfg = config(corpus, "gated", "drafting", schedule={"max_steps": 200},
                 data={"train": [str(corpus / "train.distilled.jsonl")], "heldout": [str(corpus / "heldout.distilled.jsonl")],
                       "seq_len": 48}, eval={"every_steps": 100})
    untrained = heldout_metrics(trainer.setup(dataclasses.replace(cfg, run_dir=cfg.run_dir + "-untrained")))
    run = trainer.train(cfg)
    trained = [m for m in metrics(cfg.run_dir) if "est_tpf" in m][-1]
    # drafts learned (held-out; a random tiny model's continuations are hard, so the TPF gain is small)
    assert trained["eval_diff_loss"] < untrained["eval_diff_loss"] - 0.2, (untrained, trained)
    assert trained["est_tpf"] > untrained["est_tpf"], (untrained, trained)
    assert trained["ar_agreement"] == untrained["ar_agreement"] == 1.0  # AR path untouched: still the data's source
    final = DiffusionLM.from_pretrained(Path(cfg.run_dir) / "final", dtype=torch.float64)
    assert any(float(p.abs().max()) > 0 for n, p in final.model.named_parameters() if "lora_B" in n)
    base = AutoModelForCausalLM.from_pretrained(corpus / "base", dtype=torch.float64).eval()
    x = run.train_rows.tokens[:2]
    S = x.shape[1]
    b = objective.build_batch(x, final.settings)
    with torch.no_grad():
        doubled = final.forward(b.input_ids, b.position_ids, b.attention_mask, b.mask_slots)
        ar = base(input_ids=x).logits
    V = ar.shape[-1]
    torch.testing.assert_close(doubled[:, :S, :V], ar)  # AR rows of a training row: the base model's
    assert not torch.allclose(doubled[:, S:, :V], ar)  # while the slots did change
    # decode: verify logits come from the base, so greedy == base HF generate; drafts get accepted
    accepted = 0
    for r in [json.loads(line) for line in distilled.read_text().splitlines()][:6]:
        p = r["prompt_ids"]
        hf = base.generate(torch.tensor([p]), do_sample=False, max_new_tokens=24, eos_token_id=EOS,
                           pad_token_id=0)[0, len(p):].tolist()
        g = final.generate([p], max_new_tokens=24, draft_len=4, proposals=2)[0]
        assert g.token_ids == hf
        accepted += sum(v for k, v in g.stats.accepted.items() if k > 1)
    assert accepted > 0


def test_ungated_lora_disable_and_merge(corpus, tmp_path):
    from ar2dlm.cli import main

    cfg = config(corpus, "ungated", "lora")
    trainer.train(cfg)
    lm = DiffusionLM.from_pretrained(Path(cfg.run_dir) / "final", dtype=torch.float64)
    base = AutoModelForCausalLM.from_pretrained(corpus / "base", dtype=torch.float64).eval()
    x = torch.randint(2, 90, (2, 16))
    with torch.no_grad():
        with lm.model.disable_adapter():
            off = lm.model(input_ids=x).logits[..., :96]
        on = lm.model(input_ids=x).logits
    torch.testing.assert_close(off, base(input_ids=x).logits)
    assert main(["merge", str(Path(cfg.run_dir) / "final"), str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float64).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=x).logits, on, rtol=1e-5, atol=1e-5)
    # the gated adapter refuses to merge, with a reason
    gated = config(corpus, "gated-merge", "drafting", schedule={"max_steps": 2})
    trainer.train(gated)
    assert main(["merge", str(Path(gated.run_dir) / "final"), str(tmp_path / "m2")]) == 2


def _launch(args, env_extra=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **(env_extra or {})}
    # SIGINT as a terminal gives it, whatever the suite was started under (a shell's `&` ignores SIGINT)
    return subprocess.Popen(args, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _write(cfg: TrainConfig, path: Path) -> Path:
    cfg.save_yaml(path)
    return path


def test_a_signal_the_process_ignores_stays_ignored_during_training():
    """Started with SIGINT ignored (`nohup`, a shell's `&`), a run keeps going on SIGINT; SIGTERM still stops it."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        stop = trainer._Stop()
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
        assert stop.signum == signal.SIGTERM
        stop.restore()
    finally:
        signal.signal(signal.SIGINT, previous)


def test_resume_after_a_real_signal_is_exact(corpus, tmp_path):
    n = 40  # long enough (~40 ms a step) that the signal lands mid-run on any machine
    shape = {"optim": {"batch_size": 8}, "data": {"seq_len": 64}}
    straight = config(corpus, "straight", "drafting", schedule={"max_steps": n}, **shape)
    trainer.train(straight)
    cut = config(corpus, "cut", "drafting", schedule={"max_steps": n}, **shape)
    yaml = _write(cut, tmp_path / "cut.yaml")
    proc = _launch([PY, "-m", "ar2dlm", "train", "--config", str(yaml)])
    log = Path(cut.run_dir) / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not log.exists() or len(log.read_text().splitlines()) < 2):
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out  # interrupted, not done: `train && merge` stops
    stopped = latest_checkpoint(Path(cut.run_dir))
    k = int(stopped.name.split("-")[1])
    assert 0 < k < n, f"the signal should land mid-run (stopped at {k})\n{out}"
    proc = _launch([PY, "-m", "ar2dlm", "train", "--config", str(yaml), "--resume"])
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    a = {m["step"]: m["loss"] for m in metrics(straight.run_dir) if "loss" in m}
    b = {m["step"]: m["loss"] for m in metrics(cut.run_dir) if "loss" in m}
    assert sorted(b) == list(range(1, n + 1)) or set(a) <= set(b)
    for step in range(1, n + 1):
        assert abs(a[step] - b[step]) < 1e-5, (step, a[step], b[step])
    wa = load_file(latest_checkpoint(Path(straight.run_dir)) / "trainable.safetensors")
    wb = load_file(latest_checkpoint(Path(cut.run_dir)) / "trainable.safetensors")
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name])


def test_two_processes_equal_one_process_with_accumulation(corpus, tmp_path):
    one = config(corpus, "one", "lora", optim={"batch_size": 2, "grad_accum": 2}, schedule={"max_steps": 4})
    two = config(corpus, "two", "lora", optim={"batch_size": 2, "grad_accum": 1}, schedule={"max_steps": 4})
    p1 = _launch([PY, "-m", "ar2dlm", "train", "--config", str(_write(one, tmp_path / "one.yaml"))])
    out1, _ = p1.communicate(timeout=300)
    assert p1.returncode == 0, out1
    accelerate = Path(PY).with_name("accelerate")
    # on a machine without GPUs, --multi_gpu starts torchrun workers that use gloo on the CPU
    p2 = _launch([str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                  "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "ar2dlm", "train", "--config",
                  str(_write(two, tmp_path / "two.yaml"))])
    out2, _ = p2.communicate(timeout=300)
    assert p2.returncode == 0, out2
    a = [m["loss"] for m in metrics(one.run_dir) if "loss" in m]
    b = [m["loss"] for m in metrics(two.run_dir) if "loss" in m]
    assert len(a) == len(b) == 4
    assert [m["tokens"] for m in metrics(two.run_dir) if "loss" in m][-1] == 4 * 2 * 2 * 32  # 2 processes
    for x, y in zip(a, b):
        assert abs(x - y) < 1e-4 * max(1.0, abs(x)), (a, b)


def test_context_extension_writes_and_reloads_rope(corpus):
    cfg = config(corpus, "ctx", "full", model={"rope_theta": 40000.0, "max_position_embeddings": 512},
                 data={"seq_len": 300}, optim={"batch_size": 1}, schedule={"max_steps": 2}, stage="context_extension")
    (corpus / "long.txt").write_text(" ".join(f"w{2 + i % 80}" for i in range(700)))
    cfg = TrainConfig.from_dict({**cfg.to_dict(), "data": {**cfg.to_dict()["data"], "train": [str(corpus / "long.txt")],
                                                           "heldout_fraction": 0.0}})
    run = trainer.train(cfg)  # rows of 300 tokens: longer than the old context of 256
    assert run.step == 2
    final = Path(cfg.run_dir) / "final"
    loaded = AutoModelForCausalLM.from_pretrained(final)
    assert loaded.config.max_position_embeddings == 512
    assert loaded.config.rope_parameters["rope_theta"] == 40000.0
    inv = loaded.model.rotary_emb.inv_freq
    dim = inv.shape[0] * 2
    torch.testing.assert_close(inv, 1.0 / (40000.0 ** (torch.arange(0, dim, 2).float() / dim)))


def test_config_errors_name_the_field(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  lr: fast\n")
    for text, field in (("optim:\n  lr: fast\n", "optim.lr"), ("optim:\n  lrr: 1\n", "optim.lrr"),
                        ("optim:\n  batch_size: 0\n", "optim.batch_size"), ("data:\n  train: 3\n", "data.train"),
                        ("objective:\n  block_size: 99\n", "objective.block_size"), ("seed: x\n", "seed"),
                        ("objective:\n  slot_decay: 0\n", "objective.slot_decay"),
                        ("eval: 3\n", "eval")):
        bad.write_text(text)
        with pytest.raises(ConfigError) as e:
            TrainConfig.from_yaml(bad)
        assert e.value.field == field and "bad.yaml" in str(e.value), (text, e.value)
    with pytest.raises(ConfigError) as e:
        TrainConfig.from_dict({"adapter": {"kind": "qlora"}})
    assert e.value.field == "adapter.kind"
    good = tmp_path / "good.yaml"
    good.write_text("optim:\n  lr: 0.001\n")
    cfg = TrainConfig.from_yaml(good, ["--optim.lr", "2e-4", "--schedule.max_steps", "7"])
    assert cfg.optim.lr == 2e-4 and cfg.schedule.max_steps == 7
    cfg.save_yaml(tmp_path / "round.yaml")
    assert TrainConfig.from_yaml(tmp_path / "round.yaml") == cfg


def test_existing_run_needs_resume(corpus):
    cfg = config(corpus, "twice", "drafting", schedule={"max_steps": 1})
    trainer.train(cfg)
    with pytest.raises(ConfigError, match="resume=True"):
        trainer.train(cfg)


def test_estimated_tpf_counts_leading_matches():
    tokens = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12]])
    logits = torch.full((1, 8, 20), -10.0)
    pred = [5, 6, 0, 8, 9, 10, 11, 0]  # block 0: slot 2 wrong -> 2; block 1: all of 2..3 right, 4th wrong -> 3
    for i, t in enumerate(pred):
        logits[0, i, t] = 10.0
    tpf, blocks = estimated_tpf(logits, tokens, torch.ones(1, 8, dtype=torch.bool), torch.zeros(1, 8), 4)
    assert blocks == 2 and tpf == (2 + 3) / 2
    # a block that is not all targets, or crosses documents, does not count
    mask = torch.tensor([[0, 1, 1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    tpf, blocks = estimated_tpf(logits, tokens, mask, torch.zeros(1, 8), 4)
    assert blocks == 1 and tpf == 3
    tpf, blocks = estimated_tpf(logits, tokens, torch.ones(1, 8, dtype=torch.bool),
                                  torch.tensor([[0, 0, 0, 0, 1, 1, 2, 2]]), 4)
    assert blocks == 1 and tpf == 2


def test_plot_writes_pngs(corpus):
    from ar2dlm.cli import main

    cfg = config(corpus, "plotted", "drafting", schedule={"max_steps": 4}, eval={"every_steps": 2})
    trainer.train(cfg)
    assert main(["plot", cfg.run_dir]) == 0
    for name in ("loss.png", "eval.png"):
        png = Path(cfg.run_dir) / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_a_run_can_start_from_a_trained_adapter(corpus):
    """adapter.init: the new run's adapter starts as the saved one, tensor for tensor; a shape that does not fit is
    refused naming the field."""
    first = trainer.train(config(corpus, "init-a", "drafting", schedule={"max_steps": 3}))
    final = Path(first.cfg.run_dir) / "final"
    saved = load_file(str(final / "adapter_model.safetensors"))
    run = trainer.setup(config(corpus, "init-b", "drafting", adapter={"init": str(final)}))
    own = {k: v for k, v in run.lm.model.state_dict().items() if "lora_" in k or "trainable_tokens" in k}
    fresh = trainer.setup(config(corpus, "init-c", "drafting"))
    fresh_own = {k: v for k, v in fresh.lm.model.state_dict().items() if k in own}
    assert len(own) == len(saved) > 0
    assert sum(torch.equal(a.float(), b.float()) for a, b in zip(own.values(), fresh_own.values())) < len(own) // 2
    for name, value in saved.items():  # peft's file names drop the adapter name ("default")
        match = [v for k, v in own.items() if k.replace(".default", "").endswith(name.replace("base_model.model.", ""))]
        assert len(match) == 1 and torch.equal(match[0].float(), value.float()), name
    with pytest.raises(ConfigError) as e:
        trainer.setup(config(corpus, "init-d", "drafting", adapter={"init": str(final), "rank": 4}))
    assert e.value.field == "adapter.init"
    with pytest.raises(ConfigError) as e:
        trainer.setup(config(corpus, "init-e", "drafting", adapter={"init": str(corpus / "nowhere")}))
    assert e.value.field == "adapter.init"
