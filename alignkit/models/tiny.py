"""Tiny random models and a tiny tokenizer, built in-process with no hub access.

Used by the tests (seconds) and by the "tiny" benchmark workload of `../shared/BENCHMARK.md`:
byte-level BPE with vocab 2048 trained on seeded pseudo-word text, specials `<|endoftext|>` (eos)
and `<|pad|>` (pad), left padding; Llama or GPT-2 shaped causal LMs with random weights.
"""

from __future__ import annotations

import functools
import random

import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    PreTrainedTokenizerFast,
)

EOS, PAD = "<|endoftext|>", "<|pad|>"
# A plain-text chat format so chat templates are exercised with the tiny tokenizer too.
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)
WORDS = ["good", "bad", "the", "a", "is", "was", "review", "great", "food", "service", "user", "assistant"]


def pseudo_words(n: int, seed: int = 0) -> list[str]:
    """`n` seeded pseudo-words (consonant-vowel syllables) mixed with a few English words."""
    rng = random.Random(seed)
    consonants, vowels = "bcdfghklmnprstvz", "aeiou"
    out = []
    for _ in range(n):
        if rng.random() < 0.2:
            out.append(rng.choice(WORDS))
        else:
            out.append("".join(rng.choice(consonants) + rng.choice(vowels) for _ in range(rng.randint(1, 3))))
    return out


@functools.lru_cache(maxsize=4)
def _tokenizer_json(vocab_size: int, seed: int) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    words = pseudo_words(60_000, seed)
    lines = [" ".join(words[i : i + 12]) for i in range(0, len(words), 12)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(lines, trainer)
    return tok.to_str()


def tiny_tokenizer(vocab_size: int = 2048, seed: int = 0) -> PreTrainedTokenizerFast:
    """Byte-level BPE tokenizer, deterministic for a given seed; pad on the left, with a chat template."""
    from tokenizers import Tokenizer

    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json(vocab_size, seed)),
        eos_token=EOS,
        pad_token=PAD,
        padding_side="left",
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny_llama(
    vocab_size: int = 2048,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    intermediate: int | None = None,
    seed: int = 0,
    num_labels: int | None = None,
) -> torch.nn.Module:
    """A random Llama causal LM (or sequence classifier when `num_labels` is given)."""
    tok = tiny_tokenizer(vocab_size)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate or 4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(seed)
    if num_labels is not None:
        config.num_labels = num_labels
        return LlamaForSequenceClassification(config).float().eval()
    return LlamaForCausalLM(config).float().eval()


def tiny_gpt2(vocab_size: int = 2048, hidden: int = 64, layers: int = 2, heads: int = 4, seed: int = 0):
    """A random GPT-2 causal LM (learned positions, tied embeddings, Conv1D layers), dropout off."""
    tok = tiny_tokenizer(vocab_size)
    config = GPT2Config(
        vocab_size=vocab_size,
        n_embd=hidden,
        n_layer=layers,
        n_head=heads,
        n_positions=512,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    return GPT2LMHeadModel(config).float().eval()


def bench_llama(seed: int = 0, num_labels: int | None = None):
    """The benchmark workload's policy (seed 0) or reward/value model (num_labels=1, seed 1)."""
    return tiny_llama(hidden=256, layers=4, heads=4, intermediate=1024, seed=seed, num_labels=num_labels)


def save_tiny(path, model=None, tokenizer=None) -> str:
    """Write a tiny model and tokenizer as a Hugging Face directory (a "local path" for tests)."""
    model = model if model is not None else tiny_llama()
    tokenizer = tokenizer if tokenizer is not None else tiny_tokenizer()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)
