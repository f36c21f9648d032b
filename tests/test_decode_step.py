"""The Llama-style decode step (`alignkit.rollout.decode_step`) against the model's own forward."""

import importlib
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from alignkit.errors import UserError  # noqa: E402
from alignkit.models.load import base_model  # noqa: E402
from alignkit.models.tiny import tiny_gpt2, tiny_tokenizer  # noqa: E402
from alignkit.rollout import SamplingConfig, generate  # noqa: E402
from alignkit.rollout import linear as fast_linear  # noqa: E402
from alignkit.rollout.cache import make_cache  # noqa: E402
from alignkit.rollout import decode_step as step_module  # noqa: E402
from alignkit.rollout.decode_step import decode_step  # noqa: E402

from conftest import PROMPTS  # noqa: E402

generate_module = importlib.import_module("alignkit.rollout.generate")  # the package exports the function

SHAPE = dict(vocab_size=2048, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=512, tie_word_embeddings=False)
VARIANTS = {  # family: (config class, model class, options beyond SHAPE)
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "llama-gqa-bias-llama3-rope-tied": ("LlamaConfig", "LlamaForCausalLM", dict(
        num_key_value_heads=2, attention_bias=True, mlp_bias=True, tie_word_embeddings=True, head_dim=32,
        rope_parameters=dict(rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0,
                             high_freq_factor=4.0, original_max_position_embeddings=64))),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(num_key_value_heads=1)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(num_key_value_heads=2, sliding_window=None)),
}


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def build(variant: str, tok, seed: int = 0):
    config_cls, model_cls, options = VARIANTS[variant]
    config = getattr(transformers, config_cls)(**{**SHAPE, **options}, eos_token_id=tok.eos_token_id,
                                               pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config).float().eval()
    with torch.no_grad():  # larger than the default init: peaked distributions, no near-ties in greedy decoding
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model


def run(model, tok, monkeypatch, fast: bool, eos: int | None = None, **sampling):
    """A generation with the step (checked to be used) or through the model's forward."""
    made = []
    with monkeypatch.context() as patch:
        patch.setattr(generate_module, "decode_step",
                      (lambda *a: made.append(decode_step(*a)) or made[-1]) if fast else (lambda *a: None))
        enc = tok(PROMPTS, return_tensors="pt", padding=True)
        out = generate(model, enc["input_ids"], enc["attention_mask"], SamplingConfig(**sampling),
                       eos_token_id=eos, pad_token_id=tok.pad_token_id)
    assert not fast or (made and made[0] is not None), "the generation did not use the step"
    return out


def frequent_token(gen) -> int:
    """A token the model often emits after its first: as the stop token, it ends some rows early."""
    return int(gen.response_ids[:, 1:].flatten().mode().values)


def step_of(model):
    """The step for `model` after a prompt pass (None: generation would use the model's forward)."""
    enc = tiny_tokenizer()(PROMPTS[:2], return_tensors="pt", padding=True)
    cache = make_cache(base_model(model).config, 40)
    with torch.inference_mode():
        model(**enc, cache=cache, use_cache=True)
        return decode_step(model, cache, {}, 40)


def products_from(monkeypatch, source: str) -> None:
    """Where the step's products come from: packed by `fast_linears` (every layer), packed by the step itself (the
    tiny layers are under MIN_NUMEL), or plain `F.linear` (no oneDNN)."""
    if source == "fast_linears":
        monkeypatch.setattr(fast_linear, "MIN_NUMEL", 0)
    elif source == "no oneDNN":
        monkeypatch.setattr(fast_linear, "_available", lambda: False)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("source", ["fast_linears", "step", "no oneDNN"])
def test_step_equals_the_model_forward(variant, source, tok, monkeypatch):
    """Greedy tokens identical and log-probs equal to rounding, with left padding, grouped heads, biases, scaled
    rotary embeddings, tied output layer, and rows dropping out of the batch when they end."""
    model = build(variant, tok)
    products_from(monkeypatch, source)
    made = []  # (packed, made by fast_linears) of each product the step asked for

    def spy(members, products):
        product = fast_linear.product_of(members, products)
        made.append((product.packed, product is products.get(members[0])))
        return product

    monkeypatch.setattr(step_module, "product_of", spy)
    for sampling in (dict(do_sample=False), dict(seed=0, temperature=0.7)):
        eos = frequent_token(run(model, tok, monkeypatch, fast=False, max_new_tokens=12, **sampling))
        want = run(model, tok, monkeypatch, fast=False, eos=eos, max_new_tokens=12, **sampling)
        made.clear()
        got = run(model, tok, monkeypatch, fast=True, eos=eos, max_new_tokens=12, **sampling)
        assert made == [(source != "no oneDNN", source == "fast_linears")] * 9  # 4 a layer + the output layer
        lengths = want.response_mask.sum(-1)
        assert lengths.min() < 12, "some rows should end early and drop out of the batch"
        assert torch.equal(got.response_ids, want.response_ids) and torch.equal(got.response_mask, want.response_mask)
        torch.testing.assert_close(got.logps, want.logps, atol=1e-5, rtol=0)


def test_lora_adapters_merge_into_the_step(tok, monkeypatch):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(build("llama", tok), peft.LoraConfig(r=4, target_modules="all-linear"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # a trained adapter
    assert step_of(model) is not None
    want = run(model, tok, monkeypatch, fast=False, max_new_tokens=10, seed=0)
    got = run(model, tok, monkeypatch, fast=True, max_new_tokens=10, seed=0)
    assert torch.equal(got.response_ids, want.response_ids)
    torch.testing.assert_close(got.logps, want.logps, atol=1e-5, rtol=0)
    with model.disable_adapter():  # the reference policy: the base weights alone
        assert step_of(model) is not None
        want = run(model, tok, monkeypatch, fast=False, max_new_tokens=10, seed=0)
        base = run(model, tok, monkeypatch, fast=True, max_new_tokens=10, seed=0)
    assert torch.equal(base.response_ids, want.response_ids) and not torch.equal(base.response_ids, got.response_ids)
    torch.testing.assert_close(base.logps, want.logps, atol=1e-5, rtol=0)


def test_unsupported_models_use_their_own_forward(tok):
    """Other families, scaled rotary embeddings that depend on the length, autocast, bf16: no step."""
    assert step_of(tiny_gpt2()) is None
    dynamic = transformers.LlamaConfig(**SHAPE, rope_parameters=dict(rope_type="dynamic", factor=2.0,
                                                                     rope_theta=10000.0))
    assert step_of(transformers.LlamaForCausalLM(dynamic).eval()) is None
    model = build("llama", tok)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert step_of(model) is None
    assert step_of(model) is not None
    assert step_of(model.to(torch.bfloat16)) is None


class LlamaDecoderLayer(transformers.models.llama.modeling_llama.LlamaDecoderLayer):
    """A look-alike of transformers' class (as remote-code copies are), computing something else."""

    def forward(self, hidden_states, **kwargs):
        return 0.5 * super().forward(hidden_states, **kwargs)


def test_what_may_change_the_forward_falls_back(tok):
    """Hooks on any module (a PEFT wrapper's too) or global ones, a forward replaced on a submodule, subclasses and
    look-alike classes, layers out of cache order: each can make the model compute something else, so no step."""
    peft = pytest.importorskip("peft")
    wrapped = peft.get_peft_model(build("llama", tok), peft.LoraConfig(r=4, target_modules=["q_proj"]))
    assert step_of(wrapped) is not None
    handle = wrapped.register_forward_hook(lambda module, args, out: out)
    assert step_of(wrapped) is None
    handle.remove()
    model = build("llama", tok)
    handle = torch.nn.modules.module.register_module_forward_hook(lambda module, args, out: out)
    assert step_of(model) is None
    handle.remove()
    model.model.norm.forward = lambda x: x
    assert step_of(model) is None
    del model.model.norm.forward
    assert step_of(model) is not None
    model.model.layers = torch.nn.ModuleList(list(model.model.layers)[::-1])  # each would read the other's cache
    assert step_of(model) is None
    model = build("llama", tok)
    look_alike = LlamaDecoderLayer(model.config, 1)
    look_alike.load_state_dict(model.model.layers[1].state_dict())
    model.model.layers[1] = look_alike
    assert step_of(model) is None
    subclass = type("LlamaForCausalLM", (transformers.LlamaForCausalLM,), {})(build("llama", tok).config).eval()
    assert step_of(subclass) is None


def test_prompt_learning_adapters_are_refused(tok):
    """Prefix tuning passes its own key/value cache, which our decoding replaces: an error, not wrong samples."""
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(build("llama", tok), peft.PrefixTuningConfig(task_type="CAUSAL_LM",
                                                                              num_virtual_tokens=4))
    enc = tok(PROMPTS[:2], return_tensors="pt", padding=True)
    with pytest.raises(UserError, match="prompt-learning PEFT adapters"):
        generate(model, enc["input_ids"], enc["attention_mask"], SamplingConfig(max_new_tokens=4),
                 eos_token_id=None, pad_token_id=tok.pad_token_id)
