"""Model loading from local HF directories, LoRA wiring and defaults, tokenizers without a pad token."""

import json
import warnings

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from alignkit.errors import UserError
from alignkit.models.load import LoraConfig, ModelConfig, add_lora, load_causal_lm, load_tokenizer, save_model
from alignkit.models.tiny import save_tiny, tiny_tokenizer


@pytest.mark.parametrize("fixture, expected", [
    ("tiny_llama_dir", {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}),
    ("tiny_gpt2_dir", {"c_attn", "c_proj", "c_fc"}),
])
def test_lora_defaults_and_reference_is_disabled_adapter(request, fixture, expected):
    path = request.getfixturevalue(fixture)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # PEFT warned on GPT-2's Conv1D layers (fan_in_fan_out)
        model = load_causal_lm(ModelConfig(path=path, dtype="float32"), LoraConfig(r=4))
    assert {n.split(".lora_A")[0].split(".")[-1] for n, _ in model.named_parameters() if "lora_A" in n} == expected
    assert all(("lora_" in n) == p.requires_grad for n, p in model.named_parameters())
    with torch.no_grad():
        for name, p in model.named_parameters():  # make the adapter non-zero
            if "lora_B" in name:
                p.normal_()
        ids = torch.tensor([[3, 4, 5]], device=model.device)
        policy = model(input_ids=ids).logits
        with model.disable_adapter():
            reference = model(input_ids=ids).logits
        base = load_causal_lm(ModelConfig(path=path, dtype="float32"))(input_ids=ids).logits
    assert torch.allclose(reference, base, atol=1e-5)
    assert not torch.allclose(policy, base, atol=1e-3)


def test_auto_dtype_keeps_fully_trained_weights_float32(tiny_llama_dir, monkeypatch):
    """On a bf16 GPU, `auto` is bf16 for frozen weights (and a LoRA base), float32 for weights trained in full."""
    from alignkit.models.load import resolve_dtype

    assert resolve_dtype("auto") == resolve_dtype("auto", trained=True) == torch.float32  # no bf16 GPU here
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    monkeypatch.setattr("alignkit.models.load.default_device", lambda: torch.device("cpu"))
    assert resolve_dtype("auto") == torch.bfloat16 and resolve_dtype("auto", trained=True) == torch.float32
    assert resolve_dtype("float16", trained=True) == torch.float16  # an explicit choice is kept
    assert load_causal_lm(ModelConfig(path=tiny_llama_dir)).dtype == torch.float32
    assert load_causal_lm(ModelConfig(path=tiny_llama_dir), trainable=False).dtype == torch.bfloat16
    lora = load_causal_lm(ModelConfig(path=tiny_llama_dir), LoraConfig(r=2))
    assert {p.dtype for n, p in lora.named_parameters() if "lora_" not in n} == {torch.bfloat16}


def test_explicit_bf16_weights_trained_in_full_warn(tiny_llama_dir, caplog):
    """model.dtype=bfloat16 with full fine-tuning lost ~99% of AdamW's updates at lr 1e-6, without a word."""
    load_causal_lm(ModelConfig(path=tiny_llama_dir, dtype="bfloat16"), LoraConfig(r=2))  # a LoRA base: frozen
    assert "trained in full" not in caplog.text
    assert load_causal_lm(ModelConfig(path=tiny_llama_dir, dtype="bfloat16")).dtype == torch.bfloat16
    assert "model.dtype=bfloat16 for weights trained in full: AdamW's updates below" in caplog.text


def test_lora_default_targets_qwen2():
    cfg = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2)
    model = add_lora(Qwen2ForCausalLM(cfg), LoraConfig(r=2))
    assert {n.split(".lora_A")[0].split(".")[-1] for n, _ in model.named_parameters() if "lora_A" in n} == {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_bad_lora_target_is_a_user_error(tiny_llama_dir):
    with pytest.raises(UserError, match="lora.target_modules"):
        load_causal_lm(ModelConfig(path=tiny_llama_dir), LoraConfig(r=4, target_modules=["no_such_layer"]))


def test_tokenizer_without_pad_gets_eos(tmp_path):
    tok = tiny_tokenizer()
    tok.pad_token = None
    save_tiny(tmp_path, tokenizer=tok)
    loaded = load_tokenizer(str(tmp_path))
    assert loaded.pad_token == loaded.eos_token and loaded.padding_side == "left"


def test_missing_model_path_names_it(tmp_path):
    with pytest.raises(UserError, match=str(tmp_path / "nope")):
        load_tokenizer(str(tmp_path / "nope"))


def test_a_directory_without_tokenizer_files_is_one_line(tiny_llama_dir, tmp_path):
    """transformers' ValueError ("Couldn't instantiate the backend tokenizer ...") came out as a traceback."""
    import shutil

    shutil.copy(f"{tiny_llama_dir}/config.json", tmp_path / "config.json")
    with pytest.raises(UserError, match=f"could not load a tokenizer from '{tmp_path}'"):
        load_tokenizer(str(tmp_path))


def test_a_reward_model_is_not_a_causal_lm(tmp_path):
    """A sequence classifier loads as a causal LM with a fresh head and failed deep inside generation."""
    from alignkit.models.tiny import tiny_llama

    path = save_tiny(tmp_path / "rm", tiny_llama(num_labels=1))
    with pytest.raises(UserError, match="holds a LlamaForSequenceClassification .*, not a causal LM"):
        load_causal_lm(ModelConfig(str(path)))


def test_a_lora_adapter_is_not_taken_for_a_model(tiny_llama_dir, tmp_path):
    """An adapter directory loaded as base + adapter, which a new LoRA then wrapped: the policy started from the
    base and its adapter-off reference was the base too, the adapter lost without a word."""
    policy = load_causal_lm(ModelConfig(path=tiny_llama_dir), LoraConfig(r=2))
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.normal_()  # a trained adapter: the policy differs from its base
    save_model(policy, tiny_tokenizer(), tmp_path)
    with pytest.raises(UserError, match=r"adapter' is a LoRA adapter: to train from it, .*model/ beside its adapter/"):
        load_causal_lm(ModelConfig(str(tmp_path / "adapter")), LoraConfig(r=2))
    load_causal_lm(ModelConfig(str(tmp_path / "model")), LoraConfig(r=2))  # the merged one
    sampler = load_causal_lm(ModelConfig(str(tmp_path / "adapter")), trainable=False)  # base + adapter, to sample
    merged = load_causal_lm(ModelConfig(str(tmp_path / "model")), trainable=False)
    ids = torch.tensor([[3, 4, 5]])
    base = load_causal_lm(ModelConfig(tiny_llama_dir), trainable=False)(input_ids=ids).logits
    assert torch.allclose(sampler(input_ids=ids).logits, merged(input_ids=ids).logits, atol=1e-4)
    assert not torch.allclose(merged(input_ids=ids).logits, base, atol=1e-2)


def test_a_saved_policy_stops_at_the_templates_end_of_turn_in_transformers(tiny_llama_dir, tmp_path):
    """A base checkpoint (eos <|endoftext|>) fine-tuned on a ChatML template ends replies with <|im_end|>, which the
    saved generation config did not name: transformers' generate ran past every reply."""
    from transformers import GenerationConfig

    tok = tiny_tokenizer()
    tok.add_tokens(["<|im_start|>", "<|im_end|>"], special_tokens=True)
    tok.chat_template = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>' }}"
                         "{% endfor %}")
    save_model(load_causal_lm(ModelConfig(path=tiny_llama_dir), LoraConfig(r=2)), tok, tmp_path)
    saved = GenerationConfig.from_pretrained(tmp_path / "model").eos_token_id
    assert saved == [tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")]


def test_saved_files_arrive_with_the_weights(tiny_llama_dir, tmp_path, monkeypatch):
    """A reward model's normalisation was written after model/ was renamed into place: a kill in between left a
    model that counted as done and scored without its gain and bias."""
    import alignkit.models.load as load

    seen = {}
    rename = load.replace_dir

    def checked(tmp, final):
        seen[final.name] = sorted(p.name for p in tmp.iterdir() if p.suffix == ".json" and "meta" in p.name)
        rename(tmp, final)

    monkeypatch.setattr(load, "replace_dir", checked)
    model = add_lora(load_causal_lm(ModelConfig(path=tiny_llama_dir)), LoraConfig(r=2))
    out = save_model(model, load_tokenizer(tiny_llama_dir), tmp_path / "run", files={"meta.json": {"gain": 2.0}})
    assert seen == {"adapter": [], "model": ["meta.json"]}  # in model/ before its rename, not in adapter/
    assert json.loads((out / "meta.json").read_text()) == {"gain": 2.0}


def test_save_full_model_round_trip(tiny_gpt2_dir, tmp_path):
    model = load_causal_lm(ModelConfig(path=tiny_gpt2_dir))
    out = save_model(model, load_tokenizer(tiny_gpt2_dir), tmp_path / "run")
    again = load_causal_lm(ModelConfig(path=str(out)))
    ids = torch.tensor([[1, 2, 3]], device=model.device)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, again(input_ids=ids).logits)
    assert not (tmp_path / "run" / "adapter").exists()


def test_an_interrupted_save_leaves_no_temp_dir(tiny_gpt2_dir, tmp_path):
    """Ctrl-C while the model was written left its partial temp dir (.model.tmp-*) behind for good."""
    tok = load_tokenizer(tiny_gpt2_dir)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    tok.save_pretrained = interrupted
    with pytest.raises(KeyboardInterrupt):
        save_model(load_causal_lm(ModelConfig(path=tiny_gpt2_dir)), tok, tmp_path / "run")
    assert list((tmp_path / "run").iterdir()) == []


def test_weights_stamp_changes_when_a_model_is_rewritten_at_its_path(tmp_path):
    """DPO's reference log-prob cache is keyed on it: a path alone reused the old model's log-probs."""
    import shutil

    from alignkit.models.load import weights_stamp
    from alignkit.models.tiny import tiny_llama

    path = tmp_path / "m"
    save_tiny(path, tiny_llama(seed=0))
    first = weights_stamp(path)
    assert weights_stamp(str(path)) == first  # a str or a Path, read twice: the same model
    shutil.rmtree(path)
    save_tiny(path, tiny_llama(seed=7))
    assert weights_stamp(path) != first
    assert weights_stamp("org/some-hub-model") == "org/some-hub-model"


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_disable_dropout_reaches_attention_dropout(arch):
    """Llama applies its attention dropout from a number it keeps (no nn.Dropout): with attention_dropout > 0 the
    policy stayed noisy in train mode (PPO's logp_diff_max 0.15 instead of 1e-6)."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    from alignkit.models.load import disable_dropout

    torch.manual_seed(0)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=2, attention_dropout=0.5))
    else:
        model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=2, attn_pdrop=0.5,
                                           resid_pdrop=0.5, embd_pdrop=0.5))
    model.train()
    ids = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        assert not torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)
        disable_dropout(model)
        assert torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)


def _tiny_other(tmp_path, name, config_cls, model_cls, **shape):
    tok = tiny_tokenizer()
    return save_tiny(tmp_path / name, model_cls(config_cls(vocab_size=len(tok), **shape)), tok)


def test_what_is_not_a_decoder_only_causal_lm_is_refused(tmp_path):
    """A BERT directory loaded as BertLMHeadModel and generated while looking ahead (a token's logits moved with the
    tokens after it); T5 gave transformers' traceback listing ~250 classes."""
    from transformers import BertConfig, BertForMaskedLM, T5Config, T5ForConditionalGeneration

    bert = _tiny_other(tmp_path, "bert", BertConfig, BertForMaskedLM, hidden_size=32, num_hidden_layers=1,
                       num_attention_heads=2, intermediate_size=64)
    with pytest.raises(UserError, match="is not a causal LM: a token's logits change with the tokens after it"):
        load_causal_lm(ModelConfig(bert))
    t5 = _tiny_other(tmp_path, "t5", T5Config, T5ForConditionalGeneration, d_model=32, d_ff=64, num_layers=1,
                     num_heads=2, d_kv=16)
    with pytest.raises(UserError, match="could not load a causal LM from .*t5': Unrecognized configuration class"):
        load_causal_lm(ModelConfig(t5))


def test_opt_gets_default_lora_targets_and_no_packing(tmp_path, sft_files):
    """OPT had no default LoRA targets; its masks ignore position ids, so packed documents attended to each other
    (logits off by ~2) without a word."""
    from transformers import OPTConfig, OPTForCausalLM

    from alignkit.algorithms.sft import SFTConfig, run_sft
    from alignkit.config import load_config

    opt = _tiny_other(tmp_path, "opt", OPTConfig, OPTForCausalLM, hidden_size=32, ffn_dim=64, num_hidden_layers=1,
                      num_attention_heads=2, word_embed_proj_dim=32, max_position_embeddings=128)
    model = load_causal_lm(ModelConfig(opt), LoraConfig(r=2))
    assert {n.split(".lora_A")[0].split(".")[-1] for n, _ in model.named_parameters() if "lora_A" in n} == {
        "q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"}
    args = [f"model.path={opt}", f"data.train={sft_files[0]}", "data.packing=true", "data.max_length=64",
            f"output_dir={tmp_path / 'run'}", "train.report_to=[]", "train.max_steps=1"]
    with pytest.raises(UserError, match="data.packing: opt models let a packed document attend to the one before"):
        run_sft(load_config(SFTConfig, None, args))
