"""Hostile input (#15): names never reach generated code, tracing is serialised, loads are all or
nothing, directory writes are one generation, untrusted text is bounded, only graftlib errors escape.

One tiny plain module (two linears) keeps this file cheap; every check compares numbers against the
eager model or a saved generation.
"""
from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import graftlib
from graftlib.errors import GraftError, GraftSpecError, LoadError
from graftlib.io import CONFIG_NAME, WEIGHTS_NAME, clean_staging
from graftlib.tools.killtest import X, Tiny  # the kill test's toy model and input: one definition


def _apply(spec: str, model: nn.Module | None = None) -> graftlib.Grafted:
    return graftlib.apply(model or Tiny(), spec, example_inputs=(X,))


def _randomise(g: graftlib.Grafted, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in g.trainable_parameters().values():
            p.copy_(torch.randn(p.shape, generator=gen))


def _state(g: graftlib.Grafted) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in g.state_dict().items()}


@pytest.fixture(scope="module")
def base() -> tuple[nn.Module, graftlib.Grafted]:
    torch.manual_seed(0)
    model = Tiny()
    g = graftlib.apply(model, "lora(fc1, r=2, name=first)", example_inputs=(X,))
    _randomise(g, 3)
    return model, g


# -- 1. names never become code ---------------------------------------------------------------------
def _payload(tmp_path: Path) -> tuple[str, Path]:
    marker = tmp_path / "pwned"
    return f'x"+str(open({str(marker)!r},"w"))+"', marker


def test_hostile_adapter_name_in_a_spec_is_refused(tmp_path: Path) -> None:
    name, marker = _payload(tmp_path)
    for bad in (name, "", "a.b", "\x00", "º", "class", "__base__", "keys", "a" * 65):
        spec = f"lora(fc1, r=2, name={json.dumps(bad)})"
        with pytest.raises(GraftSpecError, match="adapter name"):
            _apply(spec)
    assert not marker.exists()


def test_hostile_adapter_name_in_graft_json_is_refused(base, tmp_path: Path) -> None:
    model, g = base
    name, marker = _payload(tmp_path)
    g.save(tmp_path / "ok")
    meta = json.loads((tmp_path / "ok" / CONFIG_NAME).read_text())
    meta["adapters"][0]["name"] = name
    meta["adapters"][0]["spec"] = f"lora(fc1, r=2, name={json.dumps(name)})"
    meta["active"] = [name]
    (tmp_path / "ok" / CONFIG_NAME).write_text(json.dumps(meta))
    tensors = load_file(str(tmp_path / "ok" / WEIGHTS_NAME))
    save_file({k.replace("first/", name + "/", 1): v for k, v in tensors.items()}, str(tmp_path / "ok" / WEIGHTS_NAME))
    with pytest.raises(LoadError, match="adapter name"):
        graftlib.load(model, tmp_path / "ok", example_inputs=(X,))
    assert not marker.exists()


def test_hostile_adapter_name_from_peft_and_combine_is_refused(base, tmp_path: Path) -> None:
    model, g = base
    name, marker = _payload(tmp_path)
    g.save_peft(tmp_path / "peft")
    with pytest.raises(LoadError, match="adapter name"):
        graftlib.from_peft(model, tmp_path / "peft", adapter_name=name, example_inputs=(X,))
    with pytest.raises(GraftError, match="adapter name"):
        g.combine({"first": 1.0}, name=name)
    assert not marker.exists() and list(g.adapters) == ["first"]


def test_hostile_module_names_never_reach_generated_code(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    names = [f'a"+str(open({str(marker)!r},"w"))+"', "class", 'b")\nopen("x")\n#', "c d"]

    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            for name in names:
                self.add_module(name, nn.Linear(8, 8))
            self.register_buffer('s"x', torch.ones(8))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for name in names:
                x = getattr(self, name)(x) + getattr(self, 's"x')
            return x

    model = Odd()
    g = graftlib.apply(model, 'lora(re:"(?s).*", r=2)', example_inputs=(X,))
    assert sorted(g.sites()) == sorted(names)  # sites keep the user's names (data), attributes are generated
    assert torch.equal(g(X), model(X))  # B is zero: exactly the eager model
    _randomise(g, 1)
    assert (g(X) - model(X)).abs().max() > 1e-3
    assert torch.allclose(g.merge()(X), g(X), atol=1e-5)
    assert not marker.exists()
    code = g.runtime_module().code
    assert "open(" not in code and '"class"' not in code


# -- 2. tracing is serialised -----------------------------------------------------------------------
def test_two_threads_apply_at_once_and_a_failed_trace_leaves_no_state(monkeypatch) -> None:
    models = [Tiny(), Tiny()]
    results: dict[int, object] = {}

    def work(i: int) -> None:
        try:
            results[i] = graftlib.apply(models[i], "lora(fc1, fc2, r=2)", example_inputs=(X,))
        except BaseException as exc:  # noqa: BLE001 - recorded and asserted below
            results[i] = exc

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, g in results.items():
        assert isinstance(g, graftlib.Grafted), g
        assert torch.equal(g(X), models[i](X))
    assert not torch.compiler.is_compiling()

    def broken(*args, **kwargs):
        torch.compiler._is_compiling_flag = True  # what a torch.export failure half-way leaves
        torch.compiler._is_exporting_flag = True
        raise RuntimeError("ProxyTorchDispatchMode slot already occupied")

    monkeypatch.setattr(torch.export, "export", broken)
    with pytest.raises(graftlib.TraceError):
        _apply("lora(fc1, r=2)")
    monkeypatch.undo()
    assert not torch.compiler.is_compiling() and not torch.compiler.is_exporting()
    model = Tiny()
    assert torch.equal(_apply("lora(fc1, r=2)", model)(X), model(X))  # the next apply works


# -- 3. loads are all or nothing --------------------------------------------------------------------
def _corruptions(tmp_path: Path, g: graftlib.Grafted) -> dict[str, Path]:
    """Bad checkpoints of the kinds #15 measured; adapter renamed 'second' so the load would be new."""
    good = tmp_path / "good"
    g.save(good)
    meta = json.loads((good / CONFIG_NAME).read_text())
    meta["adapters"][0]["name"] = "second"
    meta["adapters"][0]["spec"] = "lora(fc1, r=2, name=second)"
    meta["active"] = ["second"]
    tensors = {k.replace("first/", "second/", 1): v for k, v in load_file(str(good / WEIGHTS_NAME)).items()}
    cases: dict[str, tuple[dict, dict]] = {}
    key = next(iter(tensors))
    cases["nan"] = (meta, {**tensors, key: torch.full_like(tensors[key], float("nan"))})
    cases["inf"] = (meta, {**tensors, key: torch.full_like(tensors[key], float("inf"))})
    cases["missing tensor"] = (meta, {k: v for k, v in tensors.items() if k != key})
    cases["no tensors"] = (meta, {"other/x": torch.zeros(1)})
    cases["wrong shape"] = (meta, {**tensors, key: torch.zeros(3, 3)})
    cases["version 999"] = ({**meta, "version": 999}, tensors)
    cases["two grafts in one record"] = ({**meta, "adapters": [{**meta["adapters"][0],
                                          "spec": "lora(fc1, r=2, name=second) + lora(fc2, r=2, name=x)"}]}, tensors)
    cases["unknown active"] = ({**meta, "active": ["nope"]}, tensors)
    cases["list"] = ([meta], tensors)  # type: ignore[dict-item]
    cases["bad spec"] = ({**meta, "adapters": [{**meta["adapters"][0], "spec": "lora(fc1, r=2, name=second"}]},
                         tensors)
    cases["unknown target"] = ({**meta, "adapters": [{**meta["adapters"][0],
                                "spec": "lora(nothing_here, r=2, name=second)"}]}, tensors)
    out = {}
    for label, (m, t) in cases.items():
        d = tmp_path / label.replace(" ", "_")
        d.mkdir()
        (d / CONFIG_NAME).write_text(json.dumps(m))
        save_file(t, str(d / WEIGHTS_NAME))
        out[label] = d
    deep = tmp_path / "deep"
    deep.mkdir()
    (deep / CONFIG_NAME).write_text("[" * 100_000 + "]" * 100_000)
    save_file(tensors, str(deep / WEIGHTS_NAME))
    out["deep json"] = deep
    utf = tmp_path / "utf"
    utf.mkdir()
    (utf / CONFIG_NAME).write_bytes(b'{"format": "graftlib\xff"}')
    out["invalid utf-8"] = utf
    return out


def test_failed_load_into_an_existing_graft_changes_nothing(base, tmp_path: Path) -> None:
    model, g = base
    before, active, out = _state(g), g.active_adapters, g(X).detach()
    model_before = {k: v.clone() for k, v in model.state_dict().items()}
    for label, directory in _corruptions(tmp_path, g).items():
        with pytest.raises(LoadError):
            graftlib.load(g, directory)
        assert list(g.adapters) == ["first"] and g.active_adapters == active, label
        assert all(torch.equal(before[k], v) for k, v in _state(g).items()), label
        assert torch.equal(g(X), out), label
    assert all(torch.equal(model_before[k], v) for k, v in model.state_dict().items())
    g.save(tmp_path / "retry")
    meta = json.loads((tmp_path / "retry" / CONFIG_NAME).read_text())
    assert meta["version"] == 1


def test_active_as_a_string_and_dtype_conversion_is_said(base, tmp_path: Path) -> None:
    model, g = base
    g.save(tmp_path / "s")
    meta = json.loads((tmp_path / "s" / CONFIG_NAME).read_text())
    meta["active"] = "first"
    (tmp_path / "s" / CONFIG_NAME).write_text(json.dumps(meta))
    tensors = load_file(str(tmp_path / "s" / WEIGHTS_NAME))
    save_file({k: v.half() for k, v in tensors.items()}, str(tmp_path / "s" / WEIGHTS_NAME))
    with pytest.warns(UserWarning, match="float16 -> torch.float32"):
        back = graftlib.load(model, tmp_path / "s", example_inputs=(X,))
    assert back.active_adapters == ("first",)
    assert torch.allclose(back(X), g(X), atol=1e-2)


# -- 4. atomic directory writes ---------------------------------------------------------------------
def test_failed_save_keeps_the_previous_generation_and_staging_is_cleaned(base, tmp_path: Path,
                                                                          monkeypatch) -> None:
    model, g = base
    target = tmp_path / "saved"
    g.save(target)
    (target / "README.md").write_text("kept")
    old = load_file(str(target / WEIGHTS_NAME))
    import graftlib.io as gio

    real = gio.write_directory

    def failing(directory, files):
        def boom(tmp: str) -> None:
            raise OSError(28, "No space left on device")
        real(directory, {**files, CONFIG_NAME: boom})

    monkeypatch.setattr(gio, "write_directory", failing)
    with pytest.raises(OSError):
        g.save(target)
    monkeypatch.undo()
    assert all(torch.equal(old[k], v) for k, v in load_file(str(target / WEIGHTS_NAME)).items())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["saved"]
    # a killed writer's staging folder (dead pid) is removed by the next write; README carried over
    stale = tmp_path / ".saved.graftlib-999999999-deadbeef"
    stale.mkdir()
    (stale / WEIGHTS_NAME).write_bytes(b"partial")
    g.save(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["saved"]
    assert (target / "README.md").read_text() == "kept"
    assert clean_staging(target) == []


# -- 5. bounds on untrusted text --------------------------------------------------------------------
SPEC_ERRORS = [
    ("lora(", "unexpected end"),
    ("lora(fc1, r=" + "1" * 4301 + ")", "more than 20 digits"),
    ("lora(fc1, x=" + "[" * 1000 + ")", "nested more than"),
    ('lora(re:"a{4294967296}")', "invalid regular expression"),
    ("lora(fc1, alpha=1e309)", "not a finite float"),
    ("lora(fc1, layers=0-30000000)", "at most 100000"),
    ("prompt(n=0-99999999999)", "more than 20 digits|at most 100000"),
    ("lora(fc1, r=9223372036854775807)", r"r must be in \[0, 4096\]"),
    ("lora(fc1, alpha=1e308)", r"alpha must be in \[-1e\+06, 1e\+06\]"),
    ("ptuning(encoder_layers=100000)", r"encoder_layers must be in \[1, 16\]"),
    ("lora(fc1, " + "x" * 200_000 + ")", "characters long"),
]


@pytest.mark.parametrize("spec, message", SPEC_ERRORS, ids=[s[:24] for s, _ in SPEC_ERRORS])
def test_bad_specs_are_graftspecerrors_and_fast(base, spec: str, message: str) -> None:
    _, g = base
    start = time.perf_counter()
    with pytest.raises(GraftSpecError, match=message) as info:
        g.add(spec)
    assert time.perf_counter() - start < 2.0
    assert len(str(info.value)) < 2500
    assert list(g.adapters) == ["first"]


def test_catastrophic_regex_in_a_spec_is_bounded(base) -> None:
    _, g = base
    start = time.perf_counter()
    try:
        g.add('lora(re:"(.*)*x(.*)*(.*)*y", r=2, name=slow)')
    except GraftSpecError as exc:
        assert "selects no site" in str(exc) or "takes more than" in str(exc) or "matches no" in str(exc)
    assert time.perf_counter() - start < 3.0 and list(g.adapters) == ["first"]


@pytest.mark.parametrize("spec, line", [
    ("lora(fc1,\n  r=x?)", "  line 2:   r=x?)"),
    ("lora(fc1,\tr=1, ?)", "  lora(fc1,    r=1, ?)"),
    ("lora(\"内容\", ?)", "  lora(\"内容\", ?)"),
])
def test_caret_sits_under_the_error_by_display_width(spec: str, line: str) -> None:
    with pytest.raises(GraftSpecError) as info:
        graftlib.parse_spec(spec)
    shown, caret = str(info.value).splitlines()[-2:]
    assert shown == line
    import unicodedata

    width = sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in shown[: shown.index("?")])
    assert caret == " " * width + "^"


# -- 6. PEFT configs ----------------------------------------------------------------------------------
@pytest.mark.parametrize("change, message", [
    ({"r": 4.7}, r"r=4.7 must be an integer"),
    ({"r": "abc"}, r"r='abc' must be an integer"),
    ({"r": 9223372036854775807}, "out of bounds"),
    ({"lora_alpha": 1e309}, "finite"),
    ({"target_modules": "(.*.*)*x"}, None),
    ({"target_modules": "(unclosed"}, "invalid target_modules regex"),
    ({"target_modules": 5}, "string or a list"),
    ({"rank_pattern": {"(": 2}}, "invalid rank_pattern"),
    ({"layers_to_transform": ["a"]}, "integer"),
])
def test_bad_peft_configs_raise_loaderror_and_change_nothing(base, tmp_path: Path, change, message) -> None:
    model, g = base
    g.save_peft(tmp_path / "p")
    config = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    config.update(change)
    text = json.dumps(config).replace("Infinity", "1e999")
    (tmp_path / "p" / "adapter_config.json").write_text(text)
    before, out = _state(g), g(X).detach()
    start = time.perf_counter()
    with pytest.raises(LoadError, match=message):
        graftlib.from_peft(g, tmp_path / "p", adapter_name="second")
    assert time.perf_counter() - start < 3.0
    assert list(g.adapters) == ["first"] and torch.equal(g(X), out)
    assert all(torch.equal(before[k], v) for k, v in _state(g).items())


def test_non_finite_peft_tensors_are_refused(base, tmp_path: Path) -> None:
    model, g = base
    g.save_peft(tmp_path / "p")
    path = str(tmp_path / "p" / "adapter_model.safetensors")
    tensors = load_file(path)
    key = next(iter(tensors))
    save_file({**tensors, key: tensors[key] * float("nan")}, path)
    with pytest.raises(LoadError, match="NaN or infinite"):
        graftlib.from_peft(g, tmp_path / "p", adapter_name="second")
    assert list(g.adapters) == ["first"]
