"""The grafted module's contract: training touches only adapters, modes, save/load, re-trace, compile."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import graftlib
from models import build, example_inputs, inputs_for


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def bert():
    model, inputs = build("bert")
    return model, inputs


def test_training_changes_only_adapters_and_not_the_users_model(bert):
    model, inputs = bert
    before = _snapshot(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    g = graftlib.apply(model, "lora(q,v,r=4,dropout=0.1)").train()
    trainable = g.trainable_parameters()
    assert trainable and all(".graft.default." in n for n in trainable)
    base_before = {n: p.detach().clone() for n, p in g.named_parameters() if not p.requires_grad}
    adapters_before = {n: p.detach().clone() for n, p in trainable.items()}
    optimizer = torch.optim.AdamW(trainable.values(), lr=1e-2)
    for _ in range(3):
        loss = g(**inputs).last_hidden_state.pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    for name, value in base_before.items():
        assert torch.equal(dict(g.named_parameters())[name], value), name
    assert all(not torch.equal(trainable[n], adapters_before[n]) for n in trainable if n.endswith("lora_B"))
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()}
    trainable_count, total = g.parameter_counts()
    assert trainable_count == 4 * (4 * 32 + 32 * 4)
    assert total == trainable_count + sum(p.numel() for p in model.parameters())


def test_train_and_eval_modes_switch_dropout(bert):
    model, inputs = bert
    g = graftlib.apply(model, "lora(q,v,r=4,dropout=0.5)")
    g.train()
    torch.manual_seed(1)
    a = g(**inputs).last_hidden_state
    torch.manual_seed(2)
    b = g(**inputs).last_hidden_state
    assert not torch.allclose(a, b), "train mode: dropout is random"
    g.eval()
    with torch.no_grad():
        assert torch.equal(g(**inputs).last_hidden_state, model(**inputs).last_hidden_state)
    ops = {str(n.target) for n in g.runtime_module().graph.nodes}
    assert "aten.dropout.default" not in ops


def test_batch_norm_follows_the_mode_without_touching_the_model():
    model, inputs = build("convnet")
    stats = model.bn.running_mean.clone()
    g = graftlib.apply(model, "lora(conv,r=2)", example_inputs("convnet") or inputs).train()
    g(**inputs)
    buffers = dict(g.named_buffers())
    assert not torch.equal(buffers["graph_module.bn.running_mean"], stats), "train mode updates statistics"
    assert torch.equal(model.bn.running_mean, stats), "the user's model keeps its statistics"
    g.eval()
    frozen = buffers["graph_module.bn.running_mean"].clone()
    with torch.no_grad():
        g(**inputs)
    assert torch.equal(dict(g.named_buffers())["graph_module.bn.running_mean"], frozen)


def _random_adapters(g, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in g.store.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)


def test_save_load_round_trip_is_exact(bert, tmp_path):
    model, inputs = bert
    g = graftlib.apply(model, "lora(q,v,r=4) + lora(ffn,r=2,alpha=4,name=mlp)").eval()
    _random_adapters(g)
    g.set_active(["default"])
    g.save(tmp_path / "graft")
    meta = json.loads((tmp_path / "graft" / "graft.json").read_text())
    assert [a["name"] for a in meta["adapters"]] == ["default", "mlp"]
    assert meta["active"] == ["default"]
    loaded = graftlib.load(model, tmp_path / "graft").eval()
    assert loaded.active_adapters == ("default",)
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).last_hidden_state, g(**inputs).last_hidden_state)
        loaded.set_active(["default", "mlp"])
        g.set_active(["default", "mlp"])
        assert torch.equal(loaded(**inputs).last_hidden_state, g(**inputs).last_hidden_state)
    assert sorted(p.name for p in (tmp_path / "graft").iterdir()) == ["adapters.safetensors", "graft.json"]


def test_load_rejects_missing_and_misshaped_tensors(bert, tmp_path):
    model, inputs = bert
    before = _snapshot(model)
    g = graftlib.apply(model, "lora(q,v,r=4)")
    g.save(tmp_path)
    tensors = load_file(tmp_path / "adapters.safetensors")
    key = "default/encoder.layer.0.attention.self.query/lora_A"
    bad = dict(tensors)
    bad[key] = torch.zeros(3, 32)
    save_file(bad, tmp_path / "adapters.safetensors")
    with pytest.raises(graftlib.LoadError, match=r"'default/encoder.layer.0.attention.self.query/lora_A' has "
                                                 r"shape \(3, 32\) but the model needs \(4, 32\)"):
        graftlib.load(model, tmp_path)
    del bad[key]
    save_file(bad, tmp_path / "adapters.safetensors")
    with pytest.raises(graftlib.LoadError, match="lora_A' is missing"):
        graftlib.load(model, tmp_path)
    (tmp_path / "adapters.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(graftlib.LoadError, match="not a readable safetensors file"):
        graftlib.load(model, tmp_path)
    with pytest.raises(graftlib.LoadError, match="graft.json is missing"):
        graftlib.load(model, tmp_path / "nowhere")
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name])


def test_set_active_and_delete(bert):
    model, inputs = bert
    g = graftlib.apply(model, "lora(q,r=2,name=a) + lora(v,r=2,name=b)").eval()
    _random_adapters(g)
    with torch.no_grad():
        both = g(**inputs).last_hidden_state
        g.set_active("a")
        only_a = g(**inputs).last_hidden_state
        g.delete_adapter("b")
        assert torch.equal(g(**inputs).last_hidden_state, only_a)
        g.set_active(["a"])
        assert not torch.equal(both, only_a)
    with pytest.raises(graftlib.GraftError, match="no adapter named 'b'; adapters: a"):
        g.set_active("b")
    assert "b" not in g.store


def test_merge_in_place_updates_weights_and_refuses_non_finite(bert):
    model, inputs = bert
    fresh, _ = build("bert")
    fresh.load_state_dict(model.state_dict())
    g = graftlib.apply(fresh, "lora(q,r=2)").eval()
    _random_adapters(g)
    with torch.no_grad():
        expected = g(**inputs).last_hidden_state
        merged = g.merge(inplace=True)
        assert merged is g and not g.records
        torch.testing.assert_close(g(**inputs).last_hidden_state, expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(fresh(**inputs).last_hidden_state, expected, atol=1e-5, rtol=1e-5)
    g2 = graftlib.apply(model, "lora(v,r=2)")
    with torch.no_grad():
        next(iter(g2.store.parameters())).fill_(float("inf"))
        list(g2.store.parameters())[1].fill_(1.0)
    with pytest.raises(graftlib.GraftError, match="into encoder.layer.0.attention.self.value gives non-finite"):
        g2.merge()


def test_positional_call_and_inputs_the_trace_did_not_see():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                                     num_attention_heads=4, intermediate_size=64)).eval()
    g = graftlib.apply(model, "lora(q,v,r=4)").eval()
    inputs = inputs_for("bert")
    labels = torch.tensor([0, 1])
    with torch.no_grad():
        out = g(**inputs, labels=labels)  # re-traced once with labels
        ref = model(**inputs, labels=labels)
        assert torch.equal(out.loss, ref.loss)
        assert torch.equal(g(inputs["input_ids"], inputs["attention_mask"]).logits,
                           model(inputs["input_ids"], inputs["attention_mask"]).logits)
    with torch.no_grad():
        _random_adapters(g)
        merged = g.merge()
        torch.testing.assert_close(merged(**inputs, labels=labels).loss, g(**inputs, labels=labels).loss,
                                   atol=1e-5, rtol=1e-5)
        g.merge(inplace=True)
    with pytest.raises(graftlib.GraftError, match="merged in place cannot re-trace"):
        g(**inputs, labels=torch.tensor([1, 1]), output_attentions=True)


def test_a_first_call_with_labels_at_batch_one_does_not_fix_the_batch_size():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2, intermediate_size=64)).eval()
    g = graftlib.apply(model, "lora(q,v,r=4)").eval()
    _random_adapters(g)
    merged = g.merge()
    reference = copy.deepcopy(model)
    with torch.no_grad():  # the eager reference: the merged weights in the Hugging Face model
        for name, param in reference.named_parameters():
            param.copy_(merged.graph_module.get_parameter(name))
    for batch, seq in [(1, 5), (4, 7), (3, 1)]:  # the labels graph is traced on the first call, at batch 1
        inputs = inputs_for("llama", batch=batch, seq=seq)
        inputs["attention_mask"][0, 0] = 0 if seq > 1 else 1
        with torch.no_grad():
            want = reference(**inputs, labels=inputs["input_ids"]).loss
            got = g(**inputs, labels=inputs["input_ids"]).loss
        if seq > 1:
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        else:  # one token: no next-token target
            assert got.isnan() and want.isnan()


def test_a_flag_forward_takes_through_kwargs_traces_and_the_model_is_restored():
    model, _ = build("bert")  # transformers 5: output_hidden_states only reaches forward via **kwargs
    g = graftlib.apply(model, "lora(q,v,r=4)").eval()
    inputs = inputs_for("bert", batch=3, seq=9)
    inputs["attention_mask"][0, :2] = 0
    with torch.no_grad():
        got = g(**inputs, output_hidden_states=True)
        want = model(**inputs, output_hidden_states=True)
        assert len(got.hidden_states) == len(want.hidden_states) == 3
        for mine, theirs in zip(got.hidden_states, want.hidden_states):
            assert torch.equal(mine, theirs), "B = 0: every hidden state is the base model's"
        _random_adapters(g)
        g._invalidate()
        assert torch.equal(g(**inputs, output_hidden_states=True).last_hidden_state, g(**inputs).last_hidden_state)
    assert "forward" not in model.__dict__, "the forward bound during export is removed again"


def test_untraceable_model_says_why_and_what_to_try():
    class DataDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            if x.sum() > 0:
                return self.lin(x)
            return x

    with pytest.raises(graftlib.TraceError, match="torch.export could not trace DataDependent") as err:
        graftlib.apply(DataDependent(), "lora(lin)", example_inputs=(torch.randn(2, 4),))
    assert "what to try" in str(err.value)
    with pytest.raises(graftlib.TraceError, match="pass example_inputs"):
        graftlib.apply(nn.Linear(4, 4), "lora(weight)")


def test_torch_compile_fullgraph():
    model, inputs = build("hand")
    g = graftlib.apply(model, "lora(q,v,r=4)", example_inputs("hand")).eval()
    _random_adapters(g)
    compiled = torch.compile(g, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(**inputs), g(**inputs), atol=1e-6, rtol=1e-6)


def test_dynamic_batch_and_sequence():
    model, _ = build("llama")
    g = graftlib.apply(model, "lora(q,v,r=4)").eval()
    _random_adapters(g)
    for batch, seq in [(1, 3), (4, 17)]:
        inputs = inputs_for("llama", batch=batch, seq=seq)
        with torch.no_grad():
            with g.disable_adapters():
                assert torch.equal(g(**inputs).last_hidden_state, model(**inputs).last_hidden_state)
            assert g(**inputs).last_hidden_state.shape == (batch, seq, 32)


def test_plain_module_with_positional_example_inputs():
    model, inputs = build("convnet")
    g = graftlib.apply(model, "lora(stem,r=2)", example_inputs=(inputs["pixel_values"],)).eval()
    assert g.input_names == ("pixel_values",)
    _random_adapters(g)
    with torch.no_grad():
        out = g(inputs["pixel_values"])
        a, b = g.store.tensors("default")["stem"].values()
        stem = model.stem
        low = torch.nn.functional.conv2d(inputs["pixel_values"], a, None, stem.stride, stem.padding)
        expected_stem = stem(inputs["pixel_values"]) + 2 / 2 * torch.nn.functional.conv2d(low, b)
        x = torch.relu(model.bn(expected_stem))
        x = torch.relu(model.grouped(torch.relu(model.dilated(x))))
        torch.testing.assert_close(out, model.head(x.mean(dim=(2, 3))), atol=1e-5, rtol=1e-5)


def test_dtype_change_after_grafting_follows_and_save_load_still_carries_adapters(tmp_path):
    model, inputs = build("llama")
    g = graftlib.apply(model, "lora(q,v,r=4)")
    _random_adapters(g)
    moved = copy.deepcopy(g).double().eval()  # the graph follows the weights (graftlib/retarget.py)
    assert {p.dtype for p in model.parameters()} == {torch.float32}, "the user's model is not converted"
    with torch.no_grad():
        torch.testing.assert_close(moved(**inputs).last_hidden_state.float(),
                                   g.eval()(**inputs).last_hidden_state, atol=1e-5, rtol=1e-4)
    g.save(str(tmp_path))
    loaded = graftlib.load(copy.deepcopy(model).double(), str(tmp_path)).eval()
    with torch.no_grad():
        got = loaded(**inputs).last_hidden_state
        want = g.eval()(**inputs).last_hidden_state
    assert got.dtype == torch.float64
    assert not torch.allclose(want, model(**inputs).last_hidden_state, atol=1e-4)  # the adapters matter
    torch.testing.assert_close(got.float(), want, atol=1e-5, rtol=1e-4)
