"""Property-based tests (hypothesis) for the spec parser and the loaders (#15).

Fixed seed (``derandomize=True``) and a small example count so CI pays a few seconds; a longer local
run: ``HYPOTHESIS_PROFILE=long python -m pytest -q tests/test_hostile_props.py`` (2,000 examples each).
"""
from __future__ import annotations

import json
import os
import string
import unicodedata
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import graftlib
from graftlib.errors import GraftSpecError, LoadError
from graftlib.io import CONFIG_NAME, WEIGHTS_NAME, read_config
from graftlib.spec import parse_spec

settings.register_profile("ci", max_examples=150, derandomize=True, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
settings.register_profile("long", max_examples=2000, derandomize=True, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")

# -- a grammar-aware spec strategy: mostly valid shapes with hostile leaves ----------------------------
_names = st.sampled_from(["q", "v", "fc1", "ffn", "all-linear", "x.y", "*", "a" * 70, "class", "º", "内容"])
_numbers = st.one_of(
    st.integers(-10, 10).map(str), st.integers(0, 10**30).map(str),
    st.sampled_from(["1e309", "-1e309", "1e-400", "0.5", ".5", "1.", "9" * 40, "4.7", "-0"]),
)
_strings = st.text(alphabet=string.printable + "\x00内é\u0301", max_size=12).map(json.dumps)
_values = st.recursive(
    st.one_of(_numbers, _names, _strings, st.sampled_from(["true", "false", "0-5", "0-99999999", "5-1"]),
              _strings.map(lambda s: "text:" + s)),
    lambda inner: st.lists(inner, max_size=4).map(lambda xs: "[" + ",".join(xs) + "]"),
    max_leaves=8,
)
_regexes = st.sampled_from(['"(.*)*x"', '"a{4294967296}"', '"(unclosed"', '"h\\\\.[0-3]"', '"(a|aa)*b"', '""'])
_keys = st.sampled_from(["r", "alpha", "name", "layers", "n", "m", "scale", "temperature", "seed", "dropout",
                         "encoder_layers", "init", "bogus"])
_items = st.one_of(_names, _strings, _regexes.map(lambda r: "re:" + r),
                   st.tuples(_keys, _values).map(lambda kv: f"{kv[0]}={kv[1]}"))
_calls = st.tuples(st.sampled_from(["lora", "adapter", "prompt", "prefix", "ptuning", "fusion", "nope", "1x"]),
                   st.lists(_items, max_size=5)).map(lambda c: f"{c[0]}({', '.join(c[1])})")
_whitespace = st.sampled_from(["", " ", "\n", "\t", "\n\t  "])
SPECS = st.lists(st.tuples(_calls, _whitespace), min_size=1, max_size=3).map(
    lambda cs: " + ".join(w + c for c, w in cs))
# and anything at all, cut anywhere
RAW = st.one_of(SPECS, SPECS.flatmap(lambda s: st.integers(0, len(s)).map(lambda i: s[:i])),
                st.text(max_size=60))


@settings(settings.get_profile(PROFILE))
@given(RAW)
def test_parse_spec_raises_only_graftspecerror(spec: str) -> None:
    try:
        calls = parse_spec(spec)
    except GraftSpecError as exc:
        assert len(str(exc)) < 2600
        if exc.column is not None:
            assert 0 <= exc.column <= len(spec)
        return
    assert calls and all(c.source == spec for c in calls)


def _width(text: str) -> int:
    return sum(0 if unicodedata.combining(c) else 2 if unicodedata.east_asian_width(c) in "WF" else 1
               for c in text)


@settings(settings.get_profile(PROFILE))
@given(st.text(alphabet="ab \t\n内é", max_size=20), st.text(alphabet="ab \t内", max_size=10))
def test_caret_points_at_the_offending_character(before: str, after: str) -> None:
    spec = f"lora({before!r}, {after}?)".replace("'", '"')
    try:
        parse_spec(spec)
    except GraftSpecError as exc:
        if exc.spec is None or exc.column is None or "\n" in spec[exc.column:exc.column + 1]:
            return
        shown, caret = str(exc).splitlines()[-2:]
        assert caret.endswith("^") and set(caret[:-1]) <= {" "}
        offending = spec[exc.column]
        cell = "    " if offending == "\t" else offending
        prefix_width = len(caret) - 1
        # the characters of `shown` up to the caret's cell width, then the offending character
        acc, i = 0, 0
        while acc < prefix_width and i < len(shown):
            acc += _width(shown[i])
            i += 1
        assert acc == prefix_width and shown[i:].startswith(cell if cell != "\n" else "")


# -- loaders -------------------------------------------------------------------------------------------
_json = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=False), st.text(max_size=8)),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=12,
)
_fields = st.fixed_dictionaries({}, optional={
    "format": st.one_of(st.just("graftlib"), _json), "version": st.one_of(st.just(1), _json),
    "active": st.one_of(st.just(["default"]), st.just("default"), _json),
    "inputs": st.one_of(st.just(["x"]), _json),
    "adapters": st.one_of(_json, st.lists(st.fixed_dictionaries({}, optional={
        "name": st.one_of(st.just("default"), _json), "method": st.one_of(st.just("lora"), _json),
        "spec": st.one_of(st.just("lora(fc1, r=2, name=default)"), _json), "extras": _json}), max_size=2)),
})


@settings(settings.get_profile(PROFILE))
@given(st.one_of(_fields, _json))
def test_read_config_raises_only_loaderror(tmp_path_factory, meta) -> None:
    directory = tmp_path_factory.mktemp("cfg")
    (directory / CONFIG_NAME).write_text(json.dumps(meta))
    try:
        out = read_config(directory)
    except LoadError:
        return
    assert out["format"] == "graftlib" and out["adapters"] and isinstance(out["active"], list)


@settings(settings.get_profile(PROFILE))
@given(st.binary(max_size=200))
def test_corrupt_weight_and_config_bytes_raise_only_loaderror(tmp_path_factory, blob: bytes) -> None:
    directory = tmp_path_factory.mktemp("bin")
    (directory / CONFIG_NAME).write_bytes(blob)
    (directory / WEIGHTS_NAME).write_bytes(blob)
    with pytest.raises(LoadError):
        graftlib.load(torch.nn.Linear(2, 2), directory, example_inputs=(torch.zeros(1, 2),))
    (directory / "adapter_config.json").write_bytes(blob)
    (directory / "adapter_model.safetensors").write_bytes(blob)
    with pytest.raises(LoadError):
        graftlib.from_peft(torch.nn.Linear(2, 2), directory, example_inputs=(torch.zeros(1, 2),))


@settings(settings.get_profile(PROFILE))
@given(st.dictionaries(st.sampled_from(["peft_type", "r", "lora_alpha", "target_modules", "rank_pattern",
                                        "alpha_pattern", "exclude_modules", "modules_to_save",
                                        "layers_to_transform", "layers_pattern", "num_virtual_tokens",
                                        "task_type", "bias", "init_lora_weights"]), _json, max_size=6))
def test_peft_config_fields_raise_only_loaderror(tmp_path_factory, fields) -> None:
    directory = tmp_path_factory.mktemp("peft")
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 2, "target_modules": ["fc1"], **fields}
    (directory / "adapter_config.json").write_text(json.dumps(config))
    save_file({"base_model.model.fc1.lora_A.weight": torch.zeros(2, 2)}, str(directory / "adapter_model.safetensors"))
    from graftlib.peft import _precheck, read_peft
    from graftlib.peft_checks import check_peft_config

    try:
        config, _ = read_peft(directory)
        check_peft_config(config, str(directory))
        _precheck(config, str(directory))
    except LoadError:
        return
