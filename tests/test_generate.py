"""The generation engine (`alignkit.rollout.generate`) against teacher forcing and `model.generate`."""

import contextlib
import functools
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

from alignkit.errors import UserError  # noqa: E402
from alignkit.models.tiny import tiny_gpt2, tiny_llama, tiny_tokenizer  # noqa: E402
from alignkit.rollout import SamplingConfig, generate, generate_text  # noqa: E402
from alignkit.rollout import linear as fast_linear  # noqa: E402
from alignkit.rollout.cache import BufferLayer, make_cache  # noqa: E402

from conftest import PROMPTS  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, and it keeps the tests steady on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def with_eos_bias(model, eos_id: int, bias: float):
    """Give the output layer a bias on EOS so random tiny models end rows at varied lengths."""
    head = model.get_output_embeddings()
    new = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    new.weight = head.weight
    with torch.no_grad():
        new.bias.zero_()
        new.bias[eos_id] = bias
    model.set_output_embeddings(new)
    return model.eval()


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def model(request, tok):
    build = tiny_llama if request.param == "llama" else tiny_gpt2
    return with_eos_bias(build(), tok.eos_token_id, 5.5)


@pytest.fixture(scope="module")
def batch(tok):
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    assert enc["attention_mask"][:, 0].eq(0).any(), "prompts should need left padding"
    return enc["input_ids"], enc["attention_mask"]


def run(model, tok, batch, **kw):
    return generate(model, *batch, SamplingConfig(**kw), eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)


def teacher_forced_logps(model, batch, gen, temperature: float = 1.0) -> torch.Tensor:
    """log_softmax(logits / T) of each response token from one forward over prompt + response."""
    prompt_ids, prompt_mask = batch
    ids = torch.cat([prompt_ids, gen.response_ids], dim=1)
    mask = torch.cat([prompt_mask, gen.response_mask.long()], dim=1)
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    logits = logits[:, prompt_ids.shape[1] - 1 : -1].float() / temperature  # (B, A, V)
    logps = torch.log_softmax(logits, -1).gather(-1, gen.response_ids.unsqueeze(-1)).squeeze(-1)
    return logps.masked_fill(~gen.response_mask, 0.0)


def check_masks(gen, tok):
    """Mask True up to and including the first EOS, pads and zero log-probs after it."""
    eos = tok.eos_token_id
    for ids, mask, logps in zip(gen.response_ids, gen.response_mask, gen.logps):
        n = int(mask.sum())
        assert mask[:n].all() and not mask[n:].any()
        assert (ids[: n - 1] != eos).all()
        assert (ids[n:] == tok.pad_token_id).all() and (logps[n:] == 0).all()
        if n < len(ids):
            assert ids[n - 1] == eos


@contextlib.contextmanager
def eos_bias(model, value: float):
    bias = model.get_output_embeddings().bias.data
    eos = int(bias.argmax())
    old = float(bias[eos])
    with torch.no_grad():
        bias[eos] = value
    try:
        yield
    finally:
        with torch.no_grad():
            bias[eos] = old


# (settings, EOS bias that ends rows at varied lengths under those settings)
SAMPLING = [
    (dict(temperature=1.0), 5.5),
    (dict(temperature=0.7, top_k=20), 1.6),
    (dict(temperature=1.6, top_p=0.8), 8.0),
    (dict(temperature=0.9, top_k=50, top_p=0.9, min_new_tokens=3), 1.9),
]


@pytest.mark.parametrize("settings, bias", SAMPLING)
def test_logps_equal_teacher_forcing(model, tok, batch, settings, bias):
    with eos_bias(model, bias):
        gen = run(model, tok, batch, max_new_tokens=16, seed=0, **settings)
        expected = teacher_forced_logps(model, batch, gen, settings["temperature"])
    assert gen.response_ids.dtype == torch.long and gen.response_mask.dtype == torch.bool
    assert gen.logps.dtype == torch.float32
    lengths = gen.response_mask.sum(-1)
    assert (lengths < 16).any() and (lengths > 1).any(), "EOS bias should end some rows, not all at once"
    check_masks(gen, tok)
    torch.testing.assert_close(gen.logps, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("min_new", [0, 4])
def test_greedy_equals_hf_generate(model, tok, batch, min_new):
    gen = run(model, tok, batch, max_new_tokens=12, min_new_tokens=min_new, do_sample=False)
    hf = model.generate(*batch[:1], attention_mask=batch[1], max_new_tokens=12, min_new_tokens=min_new,
                        do_sample=False, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    assert torch.equal(gen.response_ids, hf[:, batch[0].shape[1]:])
    assert (gen.response_mask.sum(-1) < 12).any()
    check_masks(gen, tok)
    torch.testing.assert_close(gen.logps, teacher_forced_logps(model, batch, gen), atol=1e-4, rtol=0)


def test_fast_linear_path_is_exact(tok, batch, monkeypatch):
    """The oneDNN route for linear layers (on by size; forced here on a tiny model) changes nothing."""
    model = with_eos_bias(tiny_llama(), tok.eos_token_id, 5.5)
    plain = run(model, tok, batch, max_new_tokens=12, do_sample=False)
    monkeypatch.setattr(fast_linear, "MIN_NUMEL", 0)
    with torch.inference_mode(), fast_linear.fast_linears(model) as products:
        assert len(products) == 15  # 7 per layer x 2 layers + the output layer
    fast = run(model, tok, batch, max_new_tokens=12, do_sample=False)
    assert torch.equal(plain.response_ids, fast.response_ids)
    torch.testing.assert_close(fast.logps, teacher_forced_logps(model, batch, fast), atol=1e-4, rtol=0)
    assert "forward" not in model.lm_head.__dict__  # the patch is undone


def test_sibling_projections_share_one_product(monkeypatch):
    """q/k/v (and gate/up) are packed side by side: one product for the three calls on one input."""
    attn = tiny_llama().model.layers[0].self_attn
    names = ("q_proj", "k_proj", "v_proj")
    x, y = torch.randn(2, 3, attn.q_proj.in_features), torch.randn(2, 3, attn.q_proj.in_features)
    want = {(n, id(t)): getattr(attn, n)(t) for n in names for t in (x, y)}
    calls, linear = [], fast_linear._linear
    monkeypatch.setattr(fast_linear, "MIN_NUMEL", 0)
    monkeypatch.setattr(fast_linear, "_linear", lambda *a: calls.append(1) or linear(*a))
    got = []
    with torch.inference_mode(), fast_linear.fast_linears(attn):
        for n, t in [("k_proj", x), ("q_proj", x), ("v_proj", x)]:  # any member may come first: one product
            got.append((n, t, getattr(attn, n)(t)))
        assert len(calls) == 1
        for n, t in [("q_proj", y), ("k_proj", x), ("v_proj", y), ("k_proj", y), ("k_proj", y)]:
            got.append((n, t, getattr(attn, n)(t)))  # another input, or an output already taken: computed
        assert len(calls) == 5  # k(y) after v(y) is the one taken from the product of v(y)
    for n, t, out in got:
        torch.testing.assert_close(out, want[n, id(t)], atol=1e-5, rtol=0)


def test_seed_reproducible(model, tok, batch):
    a = run(model, tok, batch, max_new_tokens=10, seed=1)
    b = run(model, tok, batch, max_new_tokens=10, seed=1)
    c = run(model, tok, batch, max_new_tokens=10, seed=2)
    assert torch.equal(a.response_ids, b.response_ids) and torch.equal(a.logps, b.logps)
    assert not torch.equal(a.response_ids, c.response_ids)
    g = torch.Generator().manual_seed(1)
    d = generate(model, *batch, SamplingConfig(max_new_tokens=10), eos_token_id=tok.eos_token_id,
                 pad_token_id=tok.pad_token_id, generator=g)
    assert torch.equal(a.response_ids, d.response_ids)


def test_min_new_tokens(tok, batch):
    model = with_eos_bias(tiny_llama(), tok.eos_token_id, 40.0)  # EOS is certain once allowed
    for do_sample in (True, False):
        gen = run(model, tok, batch, max_new_tokens=10, min_new_tokens=4, do_sample=do_sample, seed=0)
        assert gen.response_mask.sum(-1).eq(5).all()
        assert (gen.response_ids[:, :4] != tok.eos_token_id).all() and gen.response_ids[:, 4].eq(tok.eos_token_id).all()
        check_masks(gen, tok)
    gen = run(model, tok, batch, max_new_tokens=10, seed=0)
    assert gen.response_ids.shape == (len(PROMPTS), 1) and gen.response_mask.all()


def test_no_eos_runs_to_max(model, tok, batch):
    cfg = SamplingConfig(max_new_tokens=7, seed=0)
    gen = generate(model, *batch, cfg, eos_token_id=None, pad_token_id=tok.pad_token_id)
    assert gen.response_ids.shape == (len(PROMPTS), 7) and gen.response_mask.all()


def test_top_k_1_equals_greedy(model, tok, batch):
    greedy = run(model, tok, batch, max_new_tokens=10, do_sample=False)
    top1 = run(model, tok, batch, max_new_tokens=10, top_k=1, seed=3)
    assert torch.equal(greedy.response_ids, top1.response_ids)
    torch.testing.assert_close(greedy.logps, top1.logps)


@pytest.mark.parametrize("num_beams", [2, 3])
def test_beam_search_equals_hf(model, tok, batch, num_beams):
    gen = run(model, tok, batch, max_new_tokens=10, do_sample=False, num_beams=num_beams)
    hf = model.generate(batch[0], attention_mask=batch[1], max_new_tokens=10, do_sample=False, num_beams=num_beams,
                        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    assert torch.equal(gen.response_ids, hf[:, batch[0].shape[1]:])
    check_masks(gen, tok)
    torch.testing.assert_close(gen.logps, teacher_forced_logps(model, batch, gen), atol=1e-4, rtol=0)


def test_one_beam_is_greedy(model, tok, batch):
    greedy = run(model, tok, batch, max_new_tokens=10, do_sample=False)
    beam1 = run(model, tok, batch, max_new_tokens=10, do_sample=False, num_beams=1)
    assert torch.equal(greedy.response_ids, beam1.response_ids)


@pytest.mark.parametrize(
    "field, value",
    [("temperature", 0.0), ("top_p", 0.0), ("top_p", 1.5), ("top_k", -1), ("max_new_tokens", 0),
     ("min_new_tokens", 100), ("num_beams", 0)],
)
def test_invalid_config_raises_user_error(field, value):
    with pytest.raises(UserError, match=field):
        SamplingConfig(**{field: value}).validate()


def test_prompt_beyond_the_context_is_a_user_error():
    """GPT-2's learned positions end at n_positions (512 here): an IndexError deep in the model otherwise."""
    model = tiny_gpt2()
    ids = torch.ones(2, 509, dtype=torch.long)
    out = generate(model, ids, torch.ones_like(ids), SamplingConfig(max_new_tokens=4, do_sample=False),
                   eos_token_id=None, pad_token_id=0)
    assert out.response_ids.shape == (2, 4)  # reads 509 + 3 = 512 positions: the last new token is not fed
    ids = torch.ones(2, 510, dtype=torch.long)
    message = "longest prompt is 510 tokens; .* read 513 positions, more than its context of 512"
    with pytest.raises(UserError, match=message):
        generate(model, ids, torch.ones_like(ids), SamplingConfig(max_new_tokens=4), eos_token_id=None, pad_token_id=0)


def test_beam_with_sampling_rejected():
    with pytest.raises(UserError, match="num_beams"):
        SamplingConfig(num_beams=2, do_sample=True).validate()


def test_training_mode_restored_and_outputs_usable_in_autograd(tok, batch):
    model = tiny_llama().train()
    gen = run(model, tok, batch, max_new_tokens=5, seed=0)
    assert model.training
    ids = torch.cat([batch[0], gen.response_ids], 1)
    model(input_ids=ids).logits.sum().backward()  # fails on inference-mode tensors


def test_peft_wrapped_model(tok, batch, monkeypatch):
    peft = pytest.importorskip("peft")
    base = tiny_llama()
    greedy = run(base, tok, batch, max_new_tokens=8, do_sample=False)
    lora = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "up_proj"]))
    gen = run(lora, tok, batch, max_new_tokens=8, do_sample=False)  # LoRA B starts at zero: same model
    assert torch.equal(gen.response_ids, greedy.response_ids)
    monkeypatch.setattr(fast_linear, "MIN_NUMEL", 0)  # also route LoRA's frozen base layers through oneDNN
    sampled = run(lora, tok, batch, max_new_tokens=8, temperature=0.8, seed=0)
    torch.testing.assert_close(sampled.logps, teacher_forced_logps(lora, batch, sampled, 0.8), atol=1e-4, rtol=0)
    lora.train()
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # a trained adapter: outputs now differ from the base model
    tuned = run(lora, tok, batch, max_new_tokens=8, temperature=0.8, seed=0)  # adapters packed into the weights
    assert lora.training and not torch.equal(tuned.response_ids, sampled.response_ids)
    torch.testing.assert_close(tuned.logps, teacher_forced_logps(lora, batch, tuned, 0.8), atol=1e-4, rtol=0)
    with torch.inference_mode(), fast_linear.fast_linears(lora) as products:
        assert len(products) == 15  # 6 LoRA layers as one product each (not their 18 inner linears) + 9 plain ones
    with lora.disable_adapter():  # the reference policy: the base weights, untouched by the packing
        assert torch.equal(run(lora, tok, batch, max_new_tokens=8, do_sample=False).response_ids, greedy.response_ids)


def test_generate_text(tok):
    model = tiny_llama()
    cfg = SamplingConfig(max_new_tokens=6, seed=0)
    prompts = ["hello there", [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]]
    texts = generate_text(model, tok, prompts, cfg)
    assert len(texts) == 2 and all(isinstance(t, str) and t for t in texts)
    assert generate_text(model, tok, ["hello there"], cfg, chat=False)[0] != texts[0]  # no template applied
    no_pad = tiny_tokenizer()
    no_pad.pad_token = None
    assert generate_text(model, no_pad, prompts, cfg) == texts  # EOS pads instead; padding is masked
    with pytest.raises(UserError, match="role"):
        generate_text(model, tok, [[{"text": "x"}]], cfg)


def test_prompts_that_cannot_be_generated_from_are_errors(tok):
    """An empty prompt (no BOS) was a RuntimeError from torch.unique, or garbage beside others; a bare string
    was read as one prompt per character."""
    model = tiny_llama()
    with pytest.raises(UserError, match="prompt 1 of the batch has no tokens"):
        generate_text(model, tok, ["hello", ""], SamplingConfig(max_new_tokens=2), chat=False)
    with pytest.raises(TypeError, match="wrap a single prompt in a list"):
        generate_text(model, tok, "hello", SamplingConfig(max_new_tokens=2), chat=False)


def test_a_reward_beyond_float_range_is_a_clear_error():
    from alignkit.rewards.base import checked_scores

    with pytest.raises(UserError, match="must return numbers"):
        checked_scores([10**400], ["p"], ["c"])


def test_buffer_cache_grows_and_selects():
    layer = BufferLayer(capacity=2)
    k = torch.arange(24.0).view(3, 1, 4, 2)  # (B, H, T, D)
    layer.update(k[:, :, :3], k[:, :, :3])
    keys, _ = layer.update(k[:, :, 3:], k[:, :, 3:])
    assert torch.equal(keys, k) and layer.get_seq_length() == 4
    layer.batch_select_indices(torch.tensor([2, 0]))
    assert torch.equal(layer.keys, k[[2, 0]])
    config = tiny_llama().config
    assert make_cache(config, 8).layer_class_to_replicate.func is BufferLayer
    config.sliding_window = 4  # sliding-window models keep HF's own cache layers
    assert not isinstance(make_cache(config, 8).layer_class_to_replicate, functools.partial)


@pytest.mark.parametrize("top_k, top_p, temperature", [(0, 1.0, 1.0), (0, 0.8, 0.7), (3, 1.0, 1.3), (4, 0.7, 1.0)])
def test_sampler_frequencies(top_k, top_p, temperature):
    """Empirical token frequencies match the filtered, renormalised distribution (HF's warper order)."""
    from alignkit.rollout.sampling import TokenChooser

    logits = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -1.0])
    probs = torch.softmax(logits / temperature, -1)  # sorted descending already
    if top_k:
        probs = torch.where(torch.arange(6) < top_k, probs, 0.0)
        probs = probs / probs.sum()
    probs = probs.masked_fill(probs.cumsum(-1) - probs >= top_p, 0.0)
    probs = probs / probs.sum()
    choose = TokenChooser(True, temperature, top_k, top_p, 0, None, torch.Generator().manual_seed(0))
    tokens, logps = choose(logits.expand(40_000, 6), step=0)
    freq = torch.bincount(tokens, minlength=6) / tokens.numel()
    torch.testing.assert_close(freq, probs, atol=0.01, rtol=0)
    torch.testing.assert_close(logps, torch.log_softmax(logits / temperature, -1)[tokens])


def test_top_k_keeps_every_token_tied_with_the_kth():
    """As HF's TopKLogitsWarper: top-k kept exactly k tokens, so tokens tied with the k-th (usual with bf16 logits)
    could not be drawn while the others took their mass."""
    from transformers.generation.logits_process import TopKLogitsWarper

    from alignkit.rollout.sampling import TokenChooser

    logits = torch.tensor([[3.0, 2.0, 2.0, 2.0, 1.0], [3.0, 2.5, 2.0, 1.0, 0.0]])  # row 2: no tie at the boundary
    for top_p in (1.0, 0.9):
        choose = TokenChooser(True, 1.0, 2, top_p, 0, None, torch.Generator().manual_seed(0))
        tokens, _ = choose(logits.repeat_interleave(40_000, 0), step=0)
        for row in range(2):
            freq = torch.bincount(tokens[row * 40_000 : (row + 1) * 40_000], minlength=5) / 40_000
            hf = torch.softmax(TopKLogitsWarper(2)(None, logits[row : row + 1]), -1)[0]
            hf = hf.masked_fill(hf.cumsum(-1) - hf >= top_p, 0.0)
            torch.testing.assert_close(freq, hf / hf.sum(), atol=0.01, rtol=0)


def test_nucleus_prefilter_is_exact(monkeypatch):
    """Top-p looks for the nucleus among the top tokens first; the draws equal those of a full sort."""
    from alignkit.rollout import sampling

    logits = torch.randn(64, 5000) * 4  # peaked: each nucleus fits in the top 1024
    assert (torch.softmax(logits, -1).topk(1024).values.sum(-1) >= 0.9).all()

    def draw():
        choose = sampling.TokenChooser(True, 1.0, 0, 0.9, 0, None, torch.Generator().manual_seed(0))
        return choose(logits, step=0)[0]

    fast = draw()
    monkeypatch.setattr(sampling, "NUCLEUS_PREFILTER", 10**9)
    assert torch.equal(fast, draw())


def test_batches_draw_different_samples(tok):
    """One seeded generator runs through the batches of `generate` / `rollout`: the same prompt in two
    batches gets two samples (a generator re-seeded per batch repeated them), and the seed fixes the run."""
    from alignkit.rollout.stage import sample_rows

    model = tiny_llama()
    rows = [{"prompt": "hello there"}] * 4
    cfg = SamplingConfig(max_new_tokens=6, seed=0)
    one_by_one = [r["completion"] for r in sample_rows(model, tok, rows, cfg, batch_size=1, chat=False)]
    assert len(set(one_by_one)) == 4, one_by_one
    assert [r["completion"] for r in sample_rows(model, tok, rows, cfg, batch_size=1, chat=False)] == one_by_one


def test_a_template_that_rejects_a_prompt_is_one_line():
    """Gemma's template refuses a system turn: generate_text raised jinja's TemplateError (a traceback)."""
    from alignkit.errors import UserError
    from alignkit.models.tiny import tiny_llama, tiny_tokenizer

    tok = tiny_tokenizer()
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not "
                         "supported') }}{% endif %}{{ m['content'] }}{% endfor %}")
    with pytest.raises(UserError, match=r"^prompt: the tokenizer's chat template rejected .*System role not supported"):
        generate_text(tiny_llama(), tok, [[{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]],
                      SamplingConfig(max_new_tokens=2))
