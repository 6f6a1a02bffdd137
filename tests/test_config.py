import re

import pytest

from lmlab.core import config_toml
from lmlab.core.config import RunConfig
from lmlab.core.config_toml import (
    apply_overrides,
    build_config,
    load_config,
    load_finetune_config,
    to_toml,
    toml_value,
)
from lmlab.core.errors import UserError


def test_overrides_are_typed_and_applied(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[model]\nn_layer = 4\n[train]\nlearning_rate = 1e-3\n')
    cfg = load_config(path, ["train.learning_rate=3e-4", "model.bias=false", "train.max_iters=7",
                             "train.dtype=bfloat16", "data.dataset=data/x-char"])
    assert cfg.model.n_layer == 4
    assert cfg.train.learning_rate == 3e-4
    assert cfg.model.bias is False
    assert cfg.train.max_iters == 7
    assert cfg.train.dtype == "bfloat16"
    assert cfg.data.dataset == "data/x-char"


def test_an_int_widens_to_a_float_field():
    assert build_config({"train": {"learning_rate": 1}}, "x").train.learning_rate == 1.0


def test_unknown_key_lists_the_valid_ones(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[model]\nn_layers = 4\n")
    with pytest.raises(UserError) as err:
        load_config(path)
    message = str(err.value)
    assert "model.n_layers" in message and "n_layer" in message and "block_size" in message
    assert str(path) in message


def test_wrong_type_and_unknown_section_are_named():
    with pytest.raises(UserError, match=r"train.max_iters must be int"):
        build_config({"train": {"max_iters": "many"}}, "x")
    with pytest.raises(UserError, match=r"model.bias must be bool"):
        build_config({"model": {"bias": 1}}, "x")
    with pytest.raises(UserError, match=r"unknown section \[optim\]"):
        build_config({"optim": {}}, "x")


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_a_float_that_is_no_number_is_said_so(tmp_path, value):
    """NaN or infinity, from a TOML value or a --set one, is said to be no number (not "must be float")."""
    (tmp_path / "bad.toml").write_text(f"[train]\nlearning_rate = {value}\n")
    (tmp_path / "good.toml").write_text("[train]\n")
    with pytest.raises(UserError, match=rf"train.learning_rate is {value}; it must be a finite number\.$"):
        load_config(tmp_path / "bad.toml")
    with pytest.raises(UserError, match=rf"model.dropout is {value}; it must be a finite number\.$"):
        load_config(tmp_path / "good.toml", [f"model.dropout={value}"])


def test_invalid_values_are_rejected():
    with pytest.raises(UserError, match="divisible"):
        build_config({"model": {"n_embd": 10, "n_head": 3}}, "x")
    with pytest.raises(UserError, match="train.dtype"):
        build_config({"train": {"dtype": "int8"}}, "x")
    with pytest.raises(UserError, match="model.norm is 'batchnorm'; use layernorm or rmsnorm"):
        build_config({"model": {"norm": "batchnorm"}}, "x")
    with pytest.raises(UserError, match=r"model.n_kv_head \(4\) must divide model.n_head \(6\)"):
        build_config({"model": {"n_kv_head": 4}}, "x")
    with pytest.raises(UserError, match="even head size"):
        build_config({"model": {"n_embd": 30, "n_head": 2, "pos_emb": "rope"}}, "x")
    with pytest.raises(UserError, match=r"even head size; it is 9 \(model.head_dim"):
        build_config({"model": {"head_dim": 9, "pos_emb": "rope"}}, "x")
    for field, value, rule in (("head_dim", -1, r"is -1; set it to an integer from 0"),
                               ("mlp_hidden", -8, r"is -8; set it to an integer from 0"),
                               ("rope_theta", 0.0, r"\(0.0\) must be positive, e.g. 10000"),
                               ("norm_eps", -1e-6, r"\(-1e-06\) must be in \[0, 1\)")):
        with pytest.raises(UserError, match=rf"model.{field} {rule}"):
            build_config({"model": {field: value}}, "x")
    with pytest.raises(UserError, match="train.optimizer"):
        build_config({"train": {"optimizer": "sgd"}}, "x")
    for wrong in ("flash", 1, True):
        with pytest.raises(UserError, match="train.attention (is .*; use auto, fused, math, cudnn|must be str)"):
            build_config({"train": {"attention": wrong}}, "x")
        with pytest.raises(UserError, match="finetune.attention (is .*; use auto, fused, math, cudnn|must be str)"):
            load_finetune_config(None, [f"finetune.attention={toml_value(wrong)}"])
    for wrong in ("exponential", "WSD"):
        with pytest.raises(UserError, match=f"train.schedule is '{wrong}'; use cosine or wsd"):
            build_config({"train": {"schedule": wrong}}, "x")
    with pytest.raises(UserError, match="train.decay_fraction"):
        build_config({"train": {"schedule": "wsd", "decay_fraction": 0.0}}, "x")
    with pytest.raises(UserError, match="train.micro_batch is 'largest'; use auto or set"):
        build_config({"train": {"micro_batch": "largest"}}, "x")


def test_missing_file_and_bad_override_syntax(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_config(tmp_path / "nope.toml")
    path = tmp_path / "c.toml"
    path.write_text("")
    with pytest.raises(UserError, match="section.key=value"):
        load_config(path, ["learning_rate=1"])


def test_a_set_key_is_read_as_toml_reads_it_and_what_set_gave_is_blamed_on_set(tmp_path):
    """`--set model.options."a.b"=1` sets the plugin's option a.b (a key holding a dot, quoted as TOML quotes it),
    not a table a; a value --set gave of the wrong type, or a key it named that is none, is said to be --set's, not
    the preset's, whose own mistakes still name it."""
    assert apply_overrides({}, ['model.options."a.b"=1', "model.options.c.d=2", "model.options.'e f'=3"]) == {
        "model": {"options": {"a.b": 1, "c": {"d": 2}, "e f": 3}}}
    path = tmp_path / "c.toml"
    path.write_text("[train]\nbatch_size = 2\n")
    for settings, said in ((["train.max_iters=many"], "--set: train.max_iters must be int, got 'many'"),
                           (["train.bogus=1"], "--set: unknown key train.bogus; valid keys in [train] are"),
                           (['model.options."a.b"={}'], "--set: model.options.a.b is {}; a plugin's setting is")):
        with pytest.raises(UserError, match=re.escape(said)):
            load_config(path, settings)
    path.write_text("[train]\nmax_iters = 'many'\n")
    with pytest.raises(UserError, match=re.escape(f"{path}: train.max_iters must be int")):
        load_config(path, ["train.batch_size=2"])


@pytest.mark.parametrize("text", ['we"ird\\path', "a\rcarriage return", "tab\tand\nlines", "\x7f\x1b[0m", "é ✓"])
def test_resolved_config_round_trips_through_toml(tmp_path, text):
    """config.toml reads back whatever a text setting holds (one written with a carriage return could not be)."""
    cfg = build_config({"model": {"n_layer": 3, "dropout": 0.1}, "data": {"dataset": text}}, "x")
    path = tmp_path / "resolved.toml"
    path.write_text(to_toml(cfg), encoding="utf-8")
    assert load_config(path) == cfg
    assert load_config(path) != RunConfig()


def test_compile_takes_a_bool_or_auto():
    assert build_config({}, "x").train.compile == "auto"
    assert build_config({"train": {"compile": False}}, "x").train.compile is False
    with pytest.raises(UserError, match="train.compile"):
        build_config({"train": {"compile": "yes"}}, "x")
    with pytest.raises(UserError, match="train.compile"):
        build_config({"train": {"compile": 1}}, "x")


def test_older_spellings_are_read_as_today_s_and_said_to_be_deprecated_once(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(config_toml, "_SAID", set())  # a fresh process: none said yet
    old = tmp_path / "config.toml"  # as a run written before one option per idea holds them
    old.write_text('[model]\nbias = false\nqkv_bias = true\n[train]\nmax_seconds = 30.0\neval_every = 0.5\n'
                   'eval_interval = 17\n')
    for _ in range(2):
        cfg = load_config(old)
        assert (cfg.model.bias, cfg.train.budget_seconds, cfg.train.eval_interval) == ("qkv", 30.0, "0.5 epochs")
    notes = capsys.readouterr().err.splitlines()
    assert len(notes) == 3 and 'model.qkv_bias is deprecated and read as model.bias = "qkv"' in notes[0]
    # at their defaults, as every config.toml of those days holds them, nothing is said
    old.write_text('[model]\nqkv_bias = false\n[train]\nmax_seconds = 0.0\neval_every = "steps"\neval_interval = 5\n')
    assert load_config(old).train.eval_interval == 5 and not capsys.readouterr().err
