"""The machine check (`ar2dlm doctor`, model/exactness.py): a verdict per part of the forward, cached per machine,
consulted at load; it must say "exact" where the construction holds and name the part that breaks it where it
does not.

Oracles: the check compares a step's rows with the same rows fed alone (the AR loop) and with more rows after
them; here it is run through the real CLI on tiny models of both forwards (the lean one, transformers' under
BatchInvariant), under the instruction-set caps that send ATen and oneDNN down the other CPU kind's paths, and
against stubs that break one part on purpose.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import run_cli

from ar2dlm.core.home import ar2dlm_home
from ar2dlm.model import exactness
from ar2dlm.nn import invariant, native

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("AR2DLM_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def _doctor(path, capsys, *extra):
    rc, out, err, _ = run_cli(["doctor", path, "--dtype", "bfloat16", "--json", *extra], capsys)
    return rc, json.loads(out.strip().splitlines()[-1]), err


@pytest.mark.parametrize("arch", ["llama", "qwen2_moe"])
def test_doctor_says_exact_part_by_part_and_caches_the_verdict(arch, converted_dirs, home, capsys):
    rc, verdict, err = _doctor(converted_dirs[arch], capsys)
    assert rc == 0 and verdict["exact"], err
    parts = verdict["components"]
    assert parts["forward"] is True and parts["attention"] is True and parts["linears"] is True, parts
    assert parts["norms"] is True and parts["head"] is True
    assert "checking that every row decodes as it would alone" in err
    assert verdict["machine"].endswith("| bfloat16 | %d threads" % torch.get_num_threads())
    (cached,) = (home / "checks").glob("*.json")
    assert json.loads(cached.read_text())["components"] == parts
    rc, again, err = _doctor(converted_dirs[arch], capsys)  # read from the cache, not checked again
    assert rc == 0 and again == verdict and "checking" not in err


def test_doctor_names_the_part_that_is_not_invariant(converted_dirs, home, capsys, monkeypatch):
    """A stub attention whose rows depend on how many rows share the call (as a library kernel's blocking can):
    the check must blame attention, not the parts after it, exit 1, and loading must say so on stderr."""
    def by_row_count(rows, k, v, allowed, scale, keys_t=None, compact=None):
        out = F.scaled_dot_product_attention(rows, k, v, attn_mask=allowed, scale=scale)
        return out + 1e-2 * (rows.shape[2] > rows.shape[1])  # more rows than heads: a "multi-row" call

    monkeypatch.setattr(native, "attention", by_row_count)
    monkeypatch.setattr(invariant, "kernel_runs", lambda q, v: True)
    rc, verdict, err = _doctor(converted_dirs["llama"], capsys)
    assert rc == 1 and not verdict["exact"]
    assert verdict["components"]["attention"] is False and verdict["components"]["forward"] is False
    assert verdict["components"]["linears"] is True and verdict["components"]["norms"] is True
    assert "NOT exact (attention, forward differ)" in err  # said at load, before the table


def test_doctor_blames_linears_that_depend_on_the_row_count(converted_dirs, home, capsys, monkeypatch):
    real = invariant.linear

    def by_rows(x, weight, bias=None, tile=invariant.ROW_TILE):
        out = real(x, weight, bias, tile)
        return out + 1e-2 * (x.reshape(-1, x.shape[-1]).shape[0] > 1)

    monkeypatch.setattr(invariant, "linear", by_rows)
    rc, verdict, _ = _doctor(converted_dirs["qwen2_moe"], capsys)  # transformers' forward: F.linear -> linear
    assert rc == 1 and verdict["components"]["linears"] is False and verdict["components"]["forward"] is False


CAPS = {  # the paths another CPU kind takes: ATen's AVX2 kernels; oneDNN without bf16 (no prepacking) or without AMX
    "aten-avx2": {"ATEN_CPU_CAPABILITY": "avx2"},
    "onednn-avx2": {"ONEDNN_MAX_CPU_ISA": "AVX2"},
    "onednn-avx512-bf16": {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"},
    "reference-attention": {"AR2DLM_NATIVE": "off"},
}


@pytest.mark.parametrize("cap", sorted(CAPS))
def test_exact_on_the_other_kinds_paths(cap, converted_dirs, tmp_path):
    """The check through a real process whose ATen or oneDNN is capped to another instruction set (the kernels a
    CPU without AVX512, or without AMX, runs), or without ar2dlm's kernel: still exact, part by part."""
    home = tmp_path / "home"
    home.mkdir()
    if native.available():  # the kernel this machine already built (a fresh home would build it again)
        (home / "kernels").symlink_to(ar2dlm_home() / "kernels")
    env = {**os.environ, **CAPS[cap], "AR2DLM_HOME": str(home), "OMP_NUM_THREADS": "2",
           "PYTHONPATH": str(ROOT / "src")}
    env.pop("AR2DLM_DTYPE", None)
    proc = subprocess.run([sys.executable, "-m", "ar2dlm", "doctor", str(converted_dirs["llama"]), "--dtype",
                           "bfloat16", "--json"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    verdict = json.loads(proc.stdout.strip().splitlines()[-1])
    assert verdict["exact"] and all(ok is not False for ok in verdict["components"].values())
    if cap == "reference-attention":
        assert verdict["attention"].startswith("reference (torch ops)")


def test_float32_claims_nothing_bitwise(converted_dirs, home, capsys):
    """float32 runs transformers' forward without batch invariance: no verdict is claimed; the verbs say what
    float32 promises instead (greedy == HF generate)."""
    from ar2dlm.model.lm import DiffusionLM

    lm = DiffusionLM.from_pretrained(converted_dirs["llama"], dtype="float32")
    assert lm.exactness() is None
    rc, out, err, _ = run_cli(["generate", converted_dirs["llama"], "--prompt", "w1 w2", "--max-new-tokens", "4",
                               "--dtype", "float32"], capsys)
    assert rc == 0 and "exactness: batch invariance off (float32)" in err


def test_a_damaged_cache_is_checked_anew(converted_dirs, home, capsys):
    rc, verdict, _ = _doctor(converted_dirs["llama"], capsys)
    (cached,) = (home / "checks").glob("*.json")
    cached.write_text("{not json")
    rc, again, err = _doctor(converted_dirs["llama"], capsys)
    assert rc == 0 and again == verdict and "checking" in err
    assert exactness.VERSION == json.loads(cached.read_text())["version"]
