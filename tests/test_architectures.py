"""Refusals of architectures ar2dlm cannot decode exactly: before anything is written, naming why."""

from __future__ import annotations

import pytest
import torch
from conftest import ARCHS, EOS, VOCAB, make_tokenizer
from transformers import (
    AutoModelForCausalLM,
    BambaConfig,
    FalconH1Config,
    FalconMambaConfig,
    Gemma3TextConfig,
    GraniteMoeHybridConfig,
    JambaConfig,
    Lfm2Config,
    Llama4TextConfig,
    Mamba2Config,
    MambaConfig,
    MistralConfig,
    NemotronHConfig,
    Qwen3_5TextConfig,
    Qwen3NextConfig,
    RecurrentGemmaConfig,
    ZayaConfig,
)

from ar2dlm import convert
from ar2dlm.core.errors import ConfigError
from ar2dlm.model.architectures import check_architecture, layer_kinds, modules_with_state, takes_mask_per_kind
from ar2dlm.model.lm import DiffusionLM

_C = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
          intermediate_size=64, eos_token_id=EOS, pad_token_id=0, bos_token_id=None)
_SSM = dict(mamba_n_heads=4, mamba_d_head=16, mamba_d_state=4, mamba_n_groups=1)
_DELTA = dict(head_dim=8, layer_types=["linear_attention", "full_attention"], linear_num_value_heads=2,
              linear_num_key_heads=2, linear_key_head_dim=8, linear_value_head_dim=8)
# family -> (tiny config, a word the refusal must contain)
REFUSED = {
    "mamba": (lambda: MambaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, state_size=4,
                                  eos_token_id=EOS, pad_token_id=0), "recurrent state"),
    "mamba2": (lambda: Mamba2Config(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_heads=4, head_dim=16,
                                    state_size=4, n_groups=1, eos_token_id=EOS, pad_token_id=0), "Mamba"),
    "falcon_mamba": (lambda: FalconMambaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, state_size=4,
                                               eos_token_id=EOS, pad_token_id=0), "Mamba"),
    "jamba": (lambda: JambaConfig(**_C, num_experts=2, attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2,
                                  expert_layer_offset=1, mamba_d_state=4, mamba_dt_rank=4), "Mamba"),
    "bamba": (lambda: BambaConfig(**_C, **_SSM, attn_layer_indices=[1]), "recurrent state"),
    "falcon_h1": (lambda: FalconH1Config(**_C, mamba_n_heads=4, mamba_d_head=8, mamba_d_ssm=32, mamba_n_groups=1,
                                         mamba_d_state=4), "Mamba"),
    "granitemoehybrid": (lambda: GraniteMoeHybridConfig(**_C, **_SSM, num_local_experts=2, num_experts_per_tok=1,
                                                        layer_types=["mamba", "attention"]), "Mamba"),
    "recurrent_gemma": (lambda: RecurrentGemmaConfig(**{k: v for k, v in _C.items() if k != "num_key_value_heads"},
                                                     lru_width=32, attention_window_size=8), "RG-LRU"),
    "gemma3_bidirectional": (lambda: Gemma3TextConfig(**_C, head_dim=8, sliding_window=8,
                                                      use_bidirectional_attention=True), "not a causal LM"),
    "llama4_chunked": (lambda: Llama4TextConfig(**_C, head_dim=8, attention_chunk_size=8, num_local_experts=2),
                       "chunked attention"),
    "zaya_sliding": (lambda: ZayaConfig(**{**_C, "hidden_size": 64}, head_dim=16, num_experts=4,
                                        moe_intermediate_size=32, router_hidden_size=16, sliding_window=8,
                                        layer_types=["hybrid_sliding", "hybrid"]), "sliding-window"),
}
# recurrent hybrids whose mixers nn/predecessors.py scans row by row (decoding held to HF generate in test_recurrent.py)
RECURRENT = {
    "nemotron_h": lambda: NemotronHConfig(**{k: v for k, v in _C.items() if k != "num_hidden_layers"},
                                          layers_block_type=["mamba", "attention"], mamba_num_heads=4,
                                          mamba_head_dim=16, ssm_state_size=4, n_groups=1),
    "qwen3_next": lambda: Qwen3NextConfig(**_C, **_DELTA, num_experts=4, num_experts_per_tok=2,
                                          moe_intermediate_size=32, shared_expert_intermediate_size=32),
    "qwen3_5_text": lambda: Qwen3_5TextConfig(**_C, **_DELTA),
}
ZAYA = lambda: ZayaConfig(**{**_C, "hidden_size": 64}, head_dim=16, num_experts=4,  # noqa: E731
                          moe_intermediate_size=32, router_hidden_size=16)


def _save(config, path):
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


@pytest.mark.parametrize("family", sorted(REFUSED))
def test_convert_refuses_before_writing(family, tmp_path):
    config, why = REFUSED[family]
    base = _save(config(), tmp_path / "base")
    out = tmp_path / "out"
    with pytest.raises(ConfigError) as e:
        convert(base, out, block_size=4)
    message = str(e.value)
    assert why in message and "cannot decode" in message and "Supported:" in message
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["base"]  # no temporary sibling left either


def test_cli_convert_refuses(tmp_path, capsys):
    from ar2dlm.cli import main

    base = _save(REFUSED["bamba"][0](), tmp_path / "base")
    assert main(["convert", str(base), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "'linear_attention'" in err and "recurrent state" in err and not (tmp_path / "out").exists()


@pytest.mark.parametrize("family", sorted(RECURRENT))
def test_recurrent_hybrids_convert(family, tmp_path):
    """Their recurrent mixers are hooked (nn/predecessors.py), so convert accepts them and the result loads."""
    out = convert(_save(RECURRENT[family](), tmp_path / "base"), tmp_path / "out", block_size=4)
    lm = DiffusionLM.from_pretrained(out)
    assert "linear_attention" in layer_kinds(lm.model.config)
    assert 1 <= len(lm.generate([[5, 6, 7]], max_new_tokens=4, draft_len=4, proposals=2)[0].token_ids) <= 4


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_supported_architectures_pass(arch):
    config = ARCHS[arch](VOCAB)
    check_architecture(config)  # no error
    assert set(layer_kinds(config)) == {"full_attention"}
    assert modules_with_state(AutoModelForCausalLM.from_config(config)) == []


def test_unseen_architecture_caught_by_its_modules():
    """A config that declares no layer kinds (every layer 'full_attention' by default) but whose modules carry
    state is still refused: the module scan, not a list of model_type names, decides."""
    config = REFUSED["mamba"][0]()
    assert "MambaMixer" in modules_with_state(AutoModelForCausalLM.from_config(config))


def test_mixed_windows_need_a_mask_per_layer_kind():
    """Full and sliding layers in a model whose forward takes one mask for all layers: refused (the mask dict of
    transformers' hybrid models is what lets each kind read its own window). A Mistral config object with
    layer_types is such a model (saved and reloaded, transformers makes it a Ministral, which takes the dict)."""
    mixed = MistralConfig(**_C, sliding_window=8, layer_types=["sliding_attention", "full_attention"])
    with pytest.raises(ConfigError, match="one attention mask for all"):
        check_architecture(mixed)
    assert not takes_mask_per_kind(AutoModelForCausalLM.from_config(mixed))
    assert takes_mask_per_kind(AutoModelForCausalLM.from_config(
        Gemma3TextConfig(**_C, head_dim=8, sliding_window=8, layer_types=["sliding_attention", "full_attention"])))


def test_window_as_long_as_the_context_is_full_attention():
    config = MistralConfig(**_C, sliding_window=256, max_position_embeddings=256)
    check_architecture(config)


def test_previously_converted_checkpoint_is_refused_on_load(tmp_path):
    """A checkpoint converted before convert refused it fails on load with the reason, not an IndexError."""
    from ar2dlm.model.settings import DiffusionConfig

    d = _save(REFUSED["bamba"][0](), tmp_path / "bamba")
    DiffusionConfig(block_size=4, mask_token_id=5).save(d)
    with pytest.raises(ConfigError, match="cannot decode 'bamba'"):
        DiffusionLM.from_pretrained(d)


def test_lfm2_converts_and_decodes_from_disk(tmp_path):
    """LFM2's short convolutions are handled (nn/predecessors.py): convert accepts it, and the converted checkpoint
    decodes through the CLI path's loader (greedy == HF generate is held in test_lfm2.py)."""
    config = Lfm2Config(**_C, layer_types=["conv", "full_attention"])
    check_architecture(config)
    base = _save(config, tmp_path / "base")
    lm = DiffusionLM.from_pretrained(convert(base, tmp_path / "out", block_size=4))
    [g] = lm.generate(["w5 w7 w9"], max_new_tokens=6, draft_len=4, proposals=2)
    [prompt] = lm.encode(["w5 w7 w9"])
    hf = lm.model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=6, pad_token_id=0,
                           suppress_tokens=[lm.mask_token_id])[0, len(prompt):].tolist()
    assert g.token_ids == hf and len(hf) >= 1


def test_zaya_converts_and_decodes_from_disk(tmp_path):
    """ZAYA1's CCA layers are handled (nn/predecessors.py): convert accepts it, and the converted checkpoint decodes
    through the CLI path's loader (greedy == HF generate is held in test_zaya.py)."""
    check_architecture(ZAYA())
    base = _save(ZAYA(), tmp_path / "base")
    out = convert(base, tmp_path / "out", block_size=4)
    lm = DiffusionLM.from_pretrained(out)
    [g] = lm.generate(["w5 w7 w9"], max_new_tokens=6, draft_len=4, proposals=2)
    [prompt] = lm.encode(["w5 w7 w9"])
    hf = lm.model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=6, pad_token_id=0,
                           suppress_tokens=[lm.mask_token_id])[0, len(prompt):].tolist()
    assert g.token_ids == hf and len(hf) >= 1
