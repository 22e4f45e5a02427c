"""convert(): the output is the same AR model plus one mask-token row, and every user error is a clear one.

Oracles are the base checkpoints themselves (loaded with plain transformers), never stored constants.
"""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch
from conftest import ARCHS, CORE_ARCHS, VOCAB, make_tokenizer, tiny_model
from transformers import AutoModelForCausalLM, AutoTokenizer, BertConfig, BertForMaskedLM, T5Config

from ar2dlm import ConfigError, DiffusionConfig, DiffusionLM, convert
from ar2dlm.model.convert import add_mask_token
from ar2dlm.model.settings import SETTINGS_FILE
from ar2dlm.nn import masks

CONVERT_ARCHS = CORE_ARCHS + ["mistral", "qwen3"]
assert set(CONVERT_ARCHS) <= set(ARCHS)


def _load(path, **kw):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kw).eval()


def _random_ids(seed: int, shape=(2, 13), high: int = VOCAB) -> torch.Tensor:
    return torch.randint(0, high, shape, generator=torch.Generator().manual_seed(seed))


def _tied(model) -> bool:
    head = model.get_output_embeddings()
    return head is None or head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


def _leftovers(parent, name):
    """Anything convert may have left behind for output `name` (the output itself or a .tmp sibling)."""
    return sorted(p.name for p in parent.iterdir() if p.name == name or p.name.startswith(name + ".tmp"))


# ---------------------------------------------------------------------------- the converted checkpoint
@pytest.mark.parametrize("arch", CONVERT_ARCHS)
def test_converted_is_base_model_plus_mask_row(arch, base_dirs, converted_dirs):
    base, conv = _load(base_dirs[arch]), _load(converted_dirs[arch])
    V = base.get_input_embeddings().weight.shape[0]
    assert V == VOCAB

    # exactly one more vocabulary row, and it is the mask token everywhere
    assert conv.get_input_embeddings().weight.shape[0] == V + 1
    assert conv.config.get_text_config().vocab_size == V + 1
    settings = json.loads((converted_dirs[arch] / SETTINGS_FILE).read_text())
    tok = AutoTokenizer.from_pretrained(converted_dirs[arch])
    assert settings["mask_token"] == "<|mask|>"
    assert settings["mask_token_id"] == V == tok.convert_tokens_to_ids("<|mask|>")
    assert len(tok) == V + 1
    assert tok.decode([V], skip_special_tokens=True) == ""  # the mask is special: never shows in text
    base_tok = AutoTokenizer.from_pretrained(base_dirs[arch])
    assert tok.get_vocab() == {**base_tok.get_vocab(), "<|mask|>": V}
    assert tok("w5 w7 w94")["input_ids"] == base_tok("w5 w7 w94")["input_ids"]

    # same AR model: identical logits on the old vocabulary
    ids = _random_ids(hash(arch) % 1000)
    with torch.no_grad():
        ref, out = base(ids).logits, conv(ids).logits
    assert out.shape == (*ids.shape, V + 1)
    torch.testing.assert_close(out[..., :V], ref)
    assert torch.isfinite(out[..., V]).all()

    # mask row = mean of the old rows (embedding, and the head if untied); nothing else changed
    assert _tied(conv) == _tied(base)
    pairs = [(conv.get_input_embeddings(), base.get_input_embeddings())]
    if not _tied(base):
        pairs.append((conv.get_output_embeddings(), base.get_output_embeddings()))
    for new, old in pairs:
        torch.testing.assert_close(new.weight[:V], old.weight)
        torch.testing.assert_close(new.weight[V], old.weight.mean(0))
    base_sd, conv_sd = base.state_dict(), conv.state_dict()
    assert base_sd.keys() == conv_sd.keys()
    for name, w in base_sd.items():
        new = conv_sd[name]
        if new.shape != w.shape:  # a vocabulary matrix (or bias): one more row
            assert new.shape[0] == w.shape[0] + 1 and new.shape[1:] == w.shape[1:], name
            new = new[:w.shape[0]]
        torch.testing.assert_close(new, w, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", CONVERT_ARCHS)
def test_diffusion_forward_with_causal_mask_equals_stock_forward(arch, attn, converted_dirs):
    from ar2dlm.nn import attention

    lm = DiffusionLM.from_pretrained(converted_dirs[arch], attn_implementation=attn)
    # sdpa runs as attention.py's packed-GQA sdpa: held here to the stock model's own forward
    assert lm.model.config._attn_implementation == (attention.NAME if attn == "sdpa" else attn)
    assert lm.mask_token_id == VOCAB
    stock = _load(converted_dirs[arch], attn_implementation=attn)
    ids = _random_ids(7, (2, 11), VOCAB + 1)  # the mask token is a legal input id too
    pos = torch.arange(ids.shape[1]).expand_as(ids)
    with torch.no_grad():
        ours = lm.forward(ids, pos, masks.causal_mask(ids.shape[1], batch=ids.shape[0]))
        ref = stock(input_ids=ids).logits
    torch.testing.assert_close(ours, ref)


def test_sdpa_and_eager_agree(converted_dirs):
    ids = _random_ids(3, (1, 9))
    pos = torch.arange(9)[None]
    out = [DiffusionLM.from_pretrained(converted_dirs["llama"], attn_implementation=a)
           .forward(ids, pos, masks.causal_mask(9)).detach() for a in ("sdpa", "eager")]
    torch.testing.assert_close(out[0], out[1])


# ---------------------------------------------------------------------------- ar2dlm.json
def test_settings_file_round_trips(base_dirs, converted_dirs, tmp_path):
    path = converted_dirs["llama"]
    raw = json.loads((path / SETTINGS_FILE).read_text())
    loaded = DiffusionConfig.load(path)
    assert json.loads(json.dumps(dataclasses.asdict(loaded))) == raw  # tuples are JSON lists
    assert loaded == DiffusionConfig(block_size=4, mask_token_id=VOCAB, base_model=str(base_dirs["llama"]))
    loaded.save(tmp_path)
    assert DiffusionConfig.load(tmp_path) == loaded


def test_convert_stores_every_setting(base_dirs, tmp_path):
    out = convert(base_dirs["qwen2"], tmp_path / "out", block_size=5, masking="position_dependent",
                  loss_weight=0.5, half_life_ratio=0.25, draft_len=3, proposals=2)
    assert out == tmp_path / "out"
    expected = DiffusionConfig(block_size=5, mask_token_id=VOCAB, masking="position_dependent", loss_weight=0.5,
                               half_life_ratio=0.25, base_model=str(base_dirs["qwen2"]), draft_len=3, proposals=2)
    assert DiffusionConfig.load(out) == expected
    lm = DiffusionLM.from_pretrained(out)
    assert lm.settings == expected
    cfg = lm.decode_config()
    assert (cfg.draft_len, cfg.proposals) == (3, 2)


def test_convert_into_existing_empty_dir(base_dirs, tmp_path):
    (tmp_path / "out").mkdir()
    convert(base_dirs["llama"], tmp_path / "out", block_size=4)
    assert DiffusionConfig.load(tmp_path / "out").mask_token_id == VOCAB
    assert _leftovers(tmp_path, "out") == ["out"]  # no temporary sibling left


# ---------------------------------------------------------------------------- reuse of an existing token
def test_reuse_existing_token(base_dirs, tmp_path):
    from conftest import RESERVED, save_reserved_base

    base_dir = save_reserved_base(tmp_path / "base")
    out = convert(base_dir, tmp_path / "out", block_size=4, mask_token=RESERVED, reuse_token=True)
    settings = DiffusionConfig.load(out)
    assert settings.mask_token == RESERVED
    assert settings.mask_token_id == VOCAB == AutoTokenizer.from_pretrained(out).convert_tokens_to_ids(RESERVED)
    assert len(AutoTokenizer.from_pretrained(out)) == VOCAB + 1
    base, conv = _load(base_dir), _load(out)
    assert conv.get_input_embeddings().weight.shape[0] == VOCAB + 1  # no vocabulary growth
    ids = _random_ids(11)
    with torch.no_grad():
        torch.testing.assert_close(conv(ids).logits, base(ids).logits)  # weights untouched


def test_add_mask_token_reuse_returns_existing_id():
    model, tok = tiny_model("gpt2", vocab=VOCAB + 1), make_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|reserved_0|>"]})
    before = model.get_input_embeddings().weight.clone()
    assert add_mask_token(model, tok, "<|reserved_0|>", reuse=True) == VOCAB
    assert len(tok) == VOCAB + 1
    torch.testing.assert_close(model.get_input_embeddings().weight, before)


# ---------------------------------------------------------------------------- errors
def test_error_base_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a local checkpoint directory nor a bundled model name"):
        convert(tmp_path / "nope", tmp_path / "out")
    assert _leftovers(tmp_path, "out") == []


def test_error_dir_without_config_json(tmp_path):
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "model.safetensors").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"no config\.json"):
        convert(tmp_path / "base", tmp_path / "out")


def test_error_config_of_a_non_causal_model(tmp_path):
    T5Config(vocab_size=VOCAB).save_pretrained(tmp_path / "t5")
    with pytest.raises(ConfigError, match=r"not a causal-LM checkpoint \(model_type 't5'\)"):
        convert(tmp_path / "t5", tmp_path / "out")
    assert _leftovers(tmp_path, "out") == []


def test_error_bert_config_without_weights(tmp_path):
    BertConfig(vocab_size=VOCAB).save_pretrained(tmp_path / "bert")
    with pytest.raises(ConfigError, match=r"cannot load the weights.*is the checkpoint complete"):
        convert(tmp_path / "bert", tmp_path / "out")
    assert _leftovers(tmp_path, "out") == []


@pytest.mark.parametrize("text, match", [
    ("{not json", r"config\.json is not valid JSON"),
    ("{}", r"unreadable config\.json.*model_type"),
])
def test_error_unreadable_config_json(tmp_path, text, match):
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "config.json").write_text(text)
    with pytest.raises(ConfigError, match=match):
        convert(tmp_path / "base", tmp_path / "out")


def test_error_encoder_checkpoint_is_not_a_causal_lm(tmp_path):
    torch.manual_seed(0)
    BertForMaskedLM(BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                               intermediate_size=64)).save_pretrained(tmp_path / "bert")
    make_tokenizer().save_pretrained(tmp_path / "bert")
    try:
        out = convert(tmp_path / "bert", tmp_path / "out")
    except ConfigError as e:
        assert "causal" in str(e)
        return
    # accepted: then it must at least be causal (logits at position 0 ignore later tokens)
    model = _load(out)
    with torch.no_grad():
        a = model(torch.tensor([[5, 7, 9]])).logits[0, 0]
        b = model(torch.tensor([[5, 8, 9]])).logits[0, 0]
    torch.testing.assert_close(a, b)


def test_error_mask_token_collides(base_dirs, tmp_path):
    with pytest.raises(ConfigError) as e:
        convert(base_dirs["llama"], tmp_path / "out", mask_token="w5")
    assert e.value.field == "mask_token" and "'w5'" in str(e.value)
    assert _leftovers(tmp_path, "out") == []


def test_error_reuse_token_missing(base_dirs, tmp_path):
    with pytest.raises(ConfigError) as e:
        convert(base_dirs["llama"], tmp_path / "out", mask_token="<|nope|>", reuse_token=True)
    assert e.value.field == "mask_token" and "<|nope|>" in str(e.value)
    assert _leftovers(tmp_path, "out") == []


def test_error_output_not_empty(base_dirs, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("precious")
    with pytest.raises(ConfigError, match="exists and is not empty"):
        convert(base_dirs["llama"], tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["keep.txt"]
    assert (tmp_path / "out" / "keep.txt").read_text() == "precious"


def test_error_invalid_setting_leaves_nothing(base_dirs, tmp_path):
    for settings, field in (({"block_size": 0}, "block_size"), ({"masking": "random"}, "masking"),
                            ({"block_size": "4"}, "block_size"), ({"half_life_ratio": 0}, "half_life_ratio")):
        with pytest.raises(ConfigError) as e:
            convert(base_dirs["llama"], tmp_path / "out", **settings)
        assert e.value.field == field, e.value
    assert _leftovers(tmp_path, "out") == []


@pytest.fixture
def converted_copy(converted_dirs, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(converted_dirs["llama"], dst)
    return dst


def test_error_settings_unknown_key(converted_copy):
    raw = json.loads((converted_copy / SETTINGS_FILE).read_text())
    raw["blok_size"] = 8
    (converted_copy / SETTINGS_FILE).write_text(json.dumps(raw))
    for load in (DiffusionConfig.load, DiffusionLM.from_pretrained):
        with pytest.raises(ConfigError) as e:
            load(converted_copy)
        assert e.value.field == "blok_size" and SETTINGS_FILE in str(e.value)


def test_error_settings_invalid_json(converted_copy):
    (converted_copy / SETTINGS_FILE).write_text('{"block_size": 4,')
    with pytest.raises(ConfigError, match=r"not valid JSON.*ar2dlm convert"):
        DiffusionConfig.load(converted_copy)
    with pytest.raises(ConfigError, match="not valid JSON"):
        DiffusionLM.from_pretrained(converted_copy)


def test_error_settings_invalid_value(converted_copy):
    raw = json.loads((converted_copy / SETTINGS_FILE).read_text())
    raw["masking"] = "sometimes"
    (converted_copy / SETTINGS_FILE).write_text(json.dumps(raw))
    with pytest.raises(ConfigError) as e:
        DiffusionLM.from_pretrained(converted_copy)
    assert e.value.field == "masking" and "sometimes" in str(e.value)


@pytest.mark.parametrize("text", ['[]', '{"block_size": "4"}'])
def test_error_settings_wrong_shape(converted_copy, text):
    (converted_copy / SETTINGS_FILE).write_text(text)
    with pytest.raises(ConfigError):
        DiffusionConfig.load(converted_copy)
