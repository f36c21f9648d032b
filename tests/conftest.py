import json
import os
import random

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

from alignkit.models.tiny import pseudo_words, save_tiny, tiny_gpt2, tiny_llama  # noqa: E402

# Generation prompts of mixed lengths for the tiny tokenizer: batched, they need left padding. 12 rows: the
# decode loop keeps a finished row in the batch until an eighth of the rows are finished, then drops them;
# both states are exercised.
PROMPTS = ["the food was good and the service", "a", "review of the bad", "user: is it great", "zo", "good good",
           "the service was", "bad food is bad", "great review", "a good user", "is it", "the assistant was great"]


def make_sft_rows(n: int, seed: int = 0) -> list[dict]:
    """Toy demonstrations: the completion repeats the prompt's subject followed by 'good'."""
    rng = random.Random(seed)
    words = pseudo_words(4 * n, seed)
    rows = []
    for i in range(n):
        subject = " ".join(words[4 * i : 4 * i + rng.randint(1, 3)])
        rows.append({"prompt": f"review {subject}", "completion": f"{subject} is good good"})
    return rows


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny-llama"), tiny_llama())


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny-gpt2"), tiny_gpt2())


@pytest.fixture
def sft_files(tmp_path):
    return (
        str(write_jsonl(tmp_path / "train.jsonl", make_sft_rows(64, seed=0))),
        str(write_jsonl(tmp_path / "eval.jsonl", make_sft_rows(16, seed=1))),
    )
