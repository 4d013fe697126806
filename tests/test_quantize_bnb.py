"""Models quantised by bitsandbytes (``BitsAndBytesConfig(load_in_4bit=True)``, its CPU path) with LoRA
grafted on top, against PEFT's QLoRA on the same bitsandbytes model.

References: the bitsandbytes model itself (adapters off: bit for bit), PEFT LoRA on a second load of
the same checkpoint (outputs, gradients and losses over SGD steps), bitsandbytes' own tensors.
"""
from __future__ import annotations

import pytest
import torch

import graftlib
from graftlib.errors import GraftError, GraftSpecError

T = pytest.importorskip("transformers")
pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")

TARGETS = ["q_proj", "v_proj"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    config = T.LlamaConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=128, num_key_value_heads=2, use_cache=False)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("llama")
    T.LlamaForCausalLM(config).save_pretrained(path)
    return path


def _load(path, double_quant: bool = True):
    config = T.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=double_quant,
                                  bnb_4bit_compute_dtype=torch.float32)
    # train mode: bitsandbytes repacks the weights in place on an eval-mode CPU forward
    return T.AutoModelForCausalLM.from_pretrained(path, quantization_config=config, device_map="cpu").train()


def _ids():
    return torch.randint(3, 100, (2, 8), generator=torch.Generator().manual_seed(1))


def _peft_with(path, g):
    """PEFT QLoRA on a fresh load of the checkpoint, holding `g`'s LoRA tensors."""
    ref = peft.get_peft_model(_load(path), peft.LoraConfig(r=4, lora_alpha=4, target_modules=TARGETS,
                                                           lora_dropout=0.0)).train()
    tensors = g.store.tensors("default")
    with torch.no_grad():
        for name, module in ref.named_modules():
            key = name.removeprefix("base_model.model.")
            if key in tensors:
                module.lora_A["default"].weight.copy_(tensors[key]["lora_A"])
                module.lora_B["default"].weight.copy_(tensors[key]["lora_B"])
    return ref


def test_bnb_model_grafts_its_own_nf4_tensors(checkpoint):
    model = _load(checkpoint)
    before = {n: p.clone() for n, p in model.state_dict().items() if isinstance(p, torch.Tensor)}
    g = graftlib.apply(model, "lora(q,v,r=4)", {"input_ids": _ids()}).train()
    layers = [n for n, m in model.named_modules() if type(m).__name__ == "Linear4bit"]
    assert sorted(g.adapters["quantize"].sites) == sorted(layers) and len(layers) == 14
    stored = g.store.tensors("quantize")
    for path in layers:  # bitsandbytes' tensors, not a re-quantisation
        weight = model.get_submodule(path).weight
        state = weight.quant_state
        assert torch.equal(stored[path]["packed"], weight.data.reshape(-1))
        assert torch.equal(stored[path]["qabsmax"], state.absmax)
        assert torch.equal(stored[path]["absmax2"], state.state2.absmax)
        assert torch.equal(stored[path]["offset"], state.offset)
    ids = _ids()
    with torch.no_grad(), g.disable_adapters():
        assert torch.equal(g(input_ids=ids).logits, model(input_ids=ids).logits)  # bit for bit
    after = model.state_dict()
    assert all(torch.equal(after[n], t) for n, t in before.items()), "the user's model must not change"
    assert all(type(model.get_submodule(p)).__name__ == "Linear4bit" for p in layers)


def test_qlora_on_bnb_model_equals_peft(checkpoint):
    g = graftlib.apply(_load(checkpoint), "lora(q,v,r=4)", {"input_ids": _ids()}).train()
    torch.manual_seed(3)
    for param in g.trainable_parameters().values():
        param.data.normal_(0, 0.2)
    ref = _peft_with(checkpoint, g)
    ids = _ids()
    got, want = g(input_ids=ids, labels=ids), ref(input_ids=ids, labels=ids)
    assert (got.logits - want.logits).abs().max() < 1e-5
    got.loss.backward()
    want.loss.backward()
    grads = {n.removeprefix("base_model.model.").replace(".default.weight", ""): p.grad
             for n, p in ref.named_parameters() if p.requires_grad}
    for key, params in g.store.tensors("default").items():
        for name, param in params.items():
            assert (param.grad - grads[f"{key}.{name}"]).abs().max() < 1e-5
    # 5 SGD steps each: the same losses
    opt_g = torch.optim.SGD(list(g.trainable_parameters().values()), lr=0.1)
    opt_r = torch.optim.SGD([p for p in ref.parameters() if p.requires_grad], lr=0.1)
    for _ in range(5):
        for module, opt in ((g, opt_g), (ref, opt_r)):
            opt.zero_grad()
            loss = module(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
        with torch.no_grad():
            assert abs(float(g(input_ids=ids, labels=ids).loss) - float(ref(input_ids=ids, labels=ids).loss)) < 1e-5


def test_bnb_graft_saves_and_loads(checkpoint, tmp_path):
    g = graftlib.apply(_load(checkpoint), "lora(q,v,r=4)", {"input_ids": _ids()}).train()
    for param in g.trainable_parameters().values():
        param.data.normal_(0, 0.1)
    g.save(tmp_path)
    loaded = graftlib.load(_load(checkpoint), tmp_path, example_inputs={"input_ids": _ids()}).train()
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, g(input_ids=ids).logits)


def test_bnb_models_graftlib_cannot_read_are_refused(checkpoint):
    with pytest.raises(GraftSpecError, match="quantised already"):
        graftlib.apply(_load(checkpoint), "quantize(all-linear, bits=4) + lora(q,v)")
    with pytest.raises(GraftError, match="double quantisation"):
        graftlib.apply(_load(checkpoint, double_quant=False), "lora(q,v)")
    model = _load(checkpoint)
    model.model.layers[1].mlp.up_proj.weight.quant_state.packing_format_for_cpu = True  # as an eval forward leaves it
    with pytest.raises(GraftError, match="repacked this layer"):
        graftlib.apply(model, "lora(q,v)")
