"""Data layer: JSONL/Parquet/CSV reading with file:line errors, SFT tokenisation, collation, packing."""

import json
import logging
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

from alignkit.data.encode import text_ids  # noqa: E402
from alignkit.data.jsonl import PROMPT_SCHEMA, SFT_SCHEMA, Field, Schema, read_jsonl, read_rows, write_json, write_jsonl  # noqa: E402
from alignkit.data.sft import IGNORE_INDEX, SFTCollator, load_sft_dataset, num_target_tokens, pack, tokenize_sft  # noqa: E402
from alignkit.errors import UserError  # noqa: E402
from alignkit.models.tiny import tiny_tokenizer  # noqa: E402

CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CONVERSATION = [
    {"role": "system", "content": "be kind"},
    {"role": "user", "content": "review the food"},
    {"role": "assistant", "content": "the food is good"},
    {"role": "user", "content": "and the service"},
    {"role": "assistant", "content": "great service"},
    {"role": "user", "content": "thanks"},
]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def chatml_tok():
    """Like SmolLM2-Instruct: ChatML turns, eos = <|im_end|> (which also ends each assistant turn)."""
    t = tiny_tokenizer()
    t.add_tokens(["<|im_start|>", "<|im_end|>"], special_tokens=True)
    t.eos_token = "<|im_end|>"
    t.chat_template = CHATML
    return t


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return str(path)


def error_of(fn, *args, **kwargs) -> str:
    with pytest.raises(UserError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def trained_spans(tokenizer, example) -> list[str]:
    """Decoded runs of consecutive target tokens."""
    spans, current = [], []
    for token, label in zip(example["input_ids"], example["labels"]):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            spans.append(current)
            current = []
    spans += [current] if current else []
    return [tokenizer.decode(span) for span in spans]


def first_target(example) -> int:
    return next(i for i, label in enumerate(example["labels"]) if label != IGNORE_INDEX)


# ---------------------------------------------------------------- reading and validation


def test_read_jsonl_keeps_extra_fields_and_skips_blank_lines(tmp_path):
    path = write_lines(tmp_path / "t.jsonl", ['{"prompt": "a", "completion": "b", "id": 7}', "", "  ", '{"messages": '
                       '[{"role": "user", "content": "q"}, {"role": "assistant", "content": "r"}]}'])
    rows = read_jsonl(path, SFT_SCHEMA)
    assert rows[0] == {"prompt": "a", "completion": "b", "id": 7}
    assert rows[1]["messages"][1]["content"] == "r"
    assert read_rows(path, SFT_SCHEMA) == rows


@pytest.mark.parametrize(
    "lines, expected",
    [
        (['{"prompt": "a" "completion": "b"}'], "t.jsonl:1: not valid JSON (Expecting ',' delimiter at column 16)"),
        (['{"prompt": "a", "completion": "b"'], "t.jsonl:1: not valid JSON (Expecting ',' delimiter at column 34)"),
        (['{"prompt": "a", "completion": "b'], "t.jsonl:1: not valid JSON (Unterminated string starting at column 31)"),
        (["", "", "", '{"prompt": "a"}'],
         "t.jsonl:4: missing field 'completion' (an SFT row needs prompt+completion or messages)"),
        (['{"prompt": "a", "completion": "b"}'] * 8 + ['{"prompt": 3, "completion": "b"}'],
         "t.jsonl:9: field 'prompt' must be a string, got int"),
        (["", "", '{"prompt": "a", "completion": ""}'], "t.jsonl:3: field 'completion' is empty"),
        (['{"completion": null, "prompt": "a"}'], "t.jsonl:1: field 'completion' must be a string, got null"),
        (["[1, 2]"], "t.jsonl:1: a row must be a JSON object, got list (an SFT row needs prompt+completion or messages)"),
        (['{"x": 1}'], "t.jsonl:1: missing field 'prompt' (an SFT row needs prompt+completion or messages)"),
        (['{"prompt": "a", "completion": "b", "messages": []}'],
         "t.jsonl:1: row has both prompt+completion and messages; keep only one "
         "(an SFT row needs prompt+completion or messages)"),
        (['{"messages": [{"role": "bot", "content": "x"}]}'],
         "t.jsonl:1: field 'messages[0].role' must be one of system, user, assistant, got 'bot'"),
        (['{"messages": [{"role": "user"}]}'],
         "t.jsonl:1: field 'messages[0]' has no 'content' (each message needs role and content)"),
        (['{"messages": [{"role": "user", "content": "q"}]}'],
         "t.jsonl:1: field 'messages' has no assistant turn, so there is nothing to train on"),
        (['{"messages": "hi"}'], "t.jsonl:1: field 'messages' must be a list of {role, content} messages, got str"),
    ],
)
def test_sft_row_errors_name_line_and_field(tmp_path, lines, expected):
    path = write_lines(tmp_path / "t.jsonl", lines)
    assert error_of(read_jsonl, path, SFT_SCHEMA) == f"{tmp_path}/{expected}"


def test_file_errors(tmp_path):
    missing = tmp_path / "nope.jsonl"
    assert error_of(read_rows, missing, SFT_SCHEMA).startswith(f"{missing}: file not found")
    assert error_of(read_jsonl, missing, SFT_SCHEMA).startswith(f"{missing}: file not found")
    for name, text in [("empty.jsonl", ""), ("blank.jsonl", "\n  \n\n")]:
        path = tmp_path / name
        path.write_text(text)
        assert error_of(read_rows, path, SFT_SCHEMA).startswith(f"{path}: no rows")
    odd = tmp_path / "data.txt"
    odd.write_text("x")
    assert error_of(read_rows, odd, SFT_SCHEMA).startswith(f"{odd}: unknown data format '.txt'")
    bad_utf8 = tmp_path / "bad.jsonl"
    bad_utf8.write_bytes(b'{"prompt": "a", "completion": "b"}\n{"prompt": "\xff"}\n')
    assert error_of(read_rows, bad_utf8, SFT_SCHEMA).startswith(f"{bad_utf8}:2: not valid UTF-8")


def test_prompt_schema_and_json_array(tmp_path):
    path = write_lines(tmp_path / "p.jsonl", ['{"prompt": "hi", "reference": "x"}',
                                               '{"messages": [{"role": "user", "content": "q"}]}'])
    assert read_rows(path, PROMPT_SCHEMA)[0] == {"prompt": "hi", "reference": "x"}
    bad = write_lines(tmp_path / "q.jsonl", ['{"messages": [{"role": "user", "content": "q"}, '
                                              '{"role": "assistant", "content": "a"}]}'])
    assert "field 'messages' ends with an assistant turn" in error_of(read_rows, bad, PROMPT_SCHEMA)
    array = tmp_path / "a.json"
    array.write_text(json.dumps([{"prompt": "a"}, {"prompt": 5}]))
    assert error_of(read_rows, array, PROMPT_SCHEMA) == f"{array}:row 2: field 'prompt' must be a string, got int"


def test_custom_schema_types():
    schema = Schema("a pair row", ({"prompt": Field("str"), "chosen": Field("str"), "rejected": Field("str")},),
                    optional={"score": Field("float"), "tags": Field("list[str]")})
    assert schema.check({"prompt": "p", "chosen": "c", "rejected": "r", "score": 1, "tags": ["x"]}) is None
    assert schema.check({"prompt": "p", "chosen": "c", "rejected": "r", "score": True}) == \
        "field 'score' must be a number, got bool"
    assert schema.check({"prompt": "p", "chosen": "c", "rejected": "r", "score": float("inf")}) == \
        "field 'score' must be finite, got inf"  # a margin of Infinity stopped training with a non-finite loss
    assert schema.check({"prompt": "p", "chosen": "c", "rejected": "r", "tags": ["x", 2]}) == \
        "field 'tags[1]' must be a string, got int"
    assert schema.check({"prompt": "p", "chosen": "c"}) == \
        "missing field 'rejected' (a pair row needs prompt+chosen+rejected)"


def test_parquet_and_csv_rows_are_validated_with_row_numbers(tmp_path, capfd):
    pd = pytest.importorskip("pandas")
    good = pd.DataFrame({"prompt": ["a", "b"], "completion": ["x", "y"], "id": [1, 2]})
    good.to_parquet(tmp_path / "good.parquet")
    good.to_csv(tmp_path / "good.csv", index=False)
    for name in ("good.parquet", "good.csv"):
        assert read_rows(tmp_path / name, SFT_SCHEMA) == [
            {"prompt": "a", "completion": "x", "id": 1}, {"prompt": "b", "completion": "y", "id": 2}]
    pd.DataFrame({"prompt": ["a", "b", "c"], "completion": ["x", "y", None]}).to_csv(tmp_path / "hole.csv", index=False)
    assert error_of(read_rows, tmp_path / "hole.csv", SFT_SCHEMA) == (
        f"{tmp_path}/hole.csv:row 3: missing field 'completion' (an SFT row needs prompt+completion or messages)")
    pd.DataFrame({"prompt": [1, 2], "completion": ["x", "y"]}).to_parquet(tmp_path / "ints.parquet")
    assert error_of(read_rows, tmp_path / "ints.parquet", SFT_SCHEMA) == (
        f"{tmp_path}/ints.parquet:row 1: field 'prompt' must be a string, got int")
    (tmp_path / "broken.parquet").write_text("not parquet")
    capfd.readouterr()
    assert error_of(read_rows, tmp_path / "broken.parquet", SFT_SCHEMA).startswith(
        f"{tmp_path}/broken.parquet: could not read as Parquet")
    assert capfd.readouterr().err == ""  # datasets logged the reader's error twice before our one line


def test_csv_text_stays_text(tmp_path):
    """CSV cells of text fields are read as written (datasets guessed types: "4" became an int, "02108" 2108,
    "NA" a missing value); other cells parse as JSON when they can; a ragged row is an error."""
    (tmp_path / "t.csv").write_text('prompt,completion,margin,tags\nWhat is 2+2?,4,1.5,"[1, 2]"\nZip?,02108,,x\n'
                                    'Stock?,NA,,\n')
    pairs_like = Schema(what="a row", variants=({"prompt": Field("str"), "completion": Field("str")},),
                        optional={"margin": Field("float")})
    assert read_rows(tmp_path / "t.csv", pairs_like) == [
        {"prompt": "What is 2+2?", "completion": "4", "margin": 1.5, "tags": [1, 2]},
        {"prompt": "Zip?", "completion": "02108", "tags": "x"}, {"prompt": "Stock?", "completion": "NA"}]
    (tmp_path / "ragged.csv").write_text("prompt,completion\na,b\na,b,c\n")
    assert error_of(read_rows, tmp_path / "ragged.csv", SFT_SCHEMA) == (
        f"{tmp_path}/ragged.csv:3: 3 cells, but the header names 2 columns; quote cells that contain commas")


def test_write_jsonl_is_atomic_utf8(tmp_path):
    path = tmp_path / "out" / "rows.jsonl"
    write_jsonl(path, [{"prompt": "café ☕", "score": torch.tensor(0.5)}])
    assert path.read_text(encoding="utf-8") == '{"prompt": "café ☕", "score": 0.5}\n'
    with pytest.raises(TypeError):
        write_jsonl(path, [{"ok": 1}, {"bad": object()}])
    assert path.read_text(encoding="utf-8") == '{"prompt": "café ☕", "score": 0.5}\n'  # old file intact
    assert os.listdir(path.parent) == ["rows.jsonl"]  # no temp file left behind
    write_jsonl(path, ({"i": i} for i in range(3)))
    assert [r["i"] for r in read_jsonl(path)] == [0, 1, 2]
    assert os.listdir(path.parent) == ["rows.jsonl"]


def test_write_json_is_atomic_strict_json(tmp_path):
    path = tmp_path / "out" / "summary.json"
    write_json(path, {"kl": torch.tensor(0.25), "gold": float("nan"), "curve": [1.0, float("inf")]})
    assert json.loads(path.read_text()) == {"kl": 0.25, "gold": None, "curve": [1.0, None]}  # no NaN tokens
    before = path.read_text()
    with pytest.raises(TypeError):
        write_json(path, {"bad": object()})
    assert path.read_text() == before and os.listdir(path.parent) == ["summary.json"]


# ---------------------------------------------------------------- SFT tokenisation


def test_plain_prompt_masked_and_eos_trained(tok):
    row = {"prompt": "review the food", "completion": " the food is good"}
    ex = tokenize_sft(row, tok, 64, chat_template=False)
    k = first_target(ex)
    assert ex["input_ids"][:k] == text_ids(tok, row["prompt"])
    assert all(label == IGNORE_INDEX for label in ex["labels"][:k])
    assert trained_spans(tok, ex) == [row["completion"] + tok.eos_token]
    assert ex["input_ids"] == text_ids(tok, row["prompt"] + row["completion"]) + [tok.eos_token_id]  # natural ids
    assert ex["input_ids"].count(tok.eos_token_id) == 1
    already = tokenize_sft({"prompt": "a", "completion": " b" + tok.eos_token}, tok, 64, chat_template=False)
    assert already["input_ids"].count(tok.eos_token_id) == 1 and already["labels"][-1] == tok.eos_token_id


def test_bpe_merge_across_the_boundary_keeps_prompt_ids_exact(tok):
    row = {"prompt": "review the food ", "completion": "great service"}  # " " + "great" merge as " great"
    whole = text_ids(tok, row["prompt"] + row["completion"])
    prompt = text_ids(tok, row["prompt"])
    assert whole[: len(prompt)] != prompt  # the case this test is about
    ex = tokenize_sft(row, tok, 64, chat_template=False)
    assert ex["input_ids"][: first_target(ex)] == prompt
    assert trained_spans(tok, ex) == [row["completion"] + tok.eos_token]


def test_chat_template_prompt_completion(tok):
    row = {"prompt": "review the food", "completion": "the food is good"}
    ex = tokenize_sft(row, tok, 64, chat_template=True)
    assert trained_spans(tok, ex) == ["the food is good" + tok.eos_token]
    generation_prompt = tok.apply_chat_template([{"role": "user", "content": row["prompt"]}], tokenize=False,
                                                add_generation_prompt=True)
    assert ex["input_ids"][: first_target(ex)] == text_ids(tok, generation_prompt)  # exactly what generation sees
    assert ex["input_ids"][-1] == tok.eos_token_id and ex["input_ids"].count(tok.eos_token_id) == 1


def test_messages_without_an_assistant_turn_from_python(tok):
    """The file reader refuses them; tokenize_sft called directly gave 'max() arg is an empty sequence'."""
    with pytest.raises(UserError, match="x.jsonl:3: the messages have no assistant turn"):
        tokenize_sft({"messages": [{"role": "user", "content": "hi"}]}, tok, 64, where="x.jsonl:3")


def test_chat_template_multi_turn_trains_every_assistant_turn(tok):
    ex = tokenize_sft({"messages": CONVERSATION}, tok, 128, chat_template=True)
    assert trained_spans(tok, ex) == ["the food is good" + tok.eos_token, "great service" + tok.eos_token]
    text = tok.decode(ex["input_ids"])
    assert text.startswith("system: be kind\nuser: review the food\nassistant: ")
    assert "thanks" not in text  # turns after the last assistant turn teach nothing


def test_chatml_end_of_turn_trained_not_doubled(chatml_tok):
    t = chatml_tok
    end = t.convert_tokens_to_ids("<|im_end|>")
    assert t.eos_token_id == end
    ex = tokenize_sft({"prompt": "review the food", "completion": "the food is good"}, t, 64)
    assert trained_spans(t, ex) == ["the food is good<|im_end|>"]
    assert ex["input_ids"][-1] == end and ex["input_ids"][-2] != end
    already = tokenize_sft({"prompt": "review the food", "completion": "the food is good<|im_end|>"}, t, 64)
    assert already["input_ids"] == ex["input_ids"]
    ex = tokenize_sft({"messages": CONVERSATION}, t, 128)
    assert trained_spans(t, ex) == ["the food is good<|im_end|>", "great service<|im_end|>"]
    assert ex["input_ids"].count(end) == 5  # one per rendered turn (system, user, assistant, user, assistant)
    assert t.decode(ex["input_ids"]).startswith("<|im_start|>system\nbe kind<|im_end|>\n<|im_start|>user\n")


def test_generation_stops_at_the_turn_end_sft_trains_on_a_base_checkpoint():
    """A base checkpoint (Qwen2.5's: eos <|endoftext|>) with a ChatML template: SFT trains <|im_end|> as the end of a
    reply, but generation stopped at EOS and the generation config's ids only, so it never stopped."""
    from alignkit.models.tiny import tiny_llama
    from alignkit.rollout.generate import stop_token_ids

    t = tiny_tokenizer()
    t.add_tokens(["<|im_start|>", "<|im_end|>"], special_tokens=True)
    t.chat_template = CHATML
    end = t.convert_tokens_to_ids("<|im_end|>")
    assert t.eos_token_id != end
    assert trained_spans(t, tokenize_sft({"prompt": "a", "completion": "b"}, t, 64)) == ["b<|im_end|>"]
    assert stop_token_ids(tiny_llama(), t) == [t.eos_token_id, end]
    t.chat_template = None
    assert stop_token_ids(tiny_llama(), t) == [t.eos_token_id]


def test_a_reply_the_template_rewrites_is_trained_through_its_end_of_turn():
    """A template that rewrites the reply (Qwen3 reformats its think block) and a special token inside it: the targets
    stopped at that token ('<think>'), and the reply went untrained without a word."""
    t = tiny_tokenizer()
    t.add_tokens(["<|im_start|>", "<|im_end|>", "<think>", "</think>"], special_tokens=True)
    t.chat_template = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + "
                       "m['content'].replace('</think>', '</think>\\n\\n') + '<|im_end|>\\n' }}{% endfor %}"
                       "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
    ex = tokenize_sft({"prompt": "a", "completion": "<think>abc</think>Hello"}, t, 64)
    assert trained_spans(t, ex) == ["<think>abc</think>\n\nHello<|im_end|>"]


PHI3 = ("{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' + m['content'] + '<|end|>\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}")
QWEN3 = ("{% set ns = namespace(last_user=0) %}{% for m in messages %}{% if m['role'] == 'user' %}"
         "{% set ns.last_user = loop.index0 %}{% endif %}{% endfor %}"
         "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' }}"
         "{% if m['role'] == 'assistant' and loop.index0 > ns.last_user %}"
         "{{ '<think>\\n\\n</think>\\n\\n' }}{% endif %}"
         "{{ m['content'] + '<|im_end|>\\n' }}{% endfor %}"
         "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


@pytest.mark.parametrize("template, ends", [(PHI3, "<|end|>"), (QWEN3, "<|im_end|>")])
def test_templates_that_render_a_turn_otherwise_once_others_follow(template, ends):
    """Phi-3 ends a conversation with EOS, Qwen3 drops the think block of earlier turns: a turn rendered alone is no
    prefix of the whole conversation, and every multi-turn row was refused."""
    t = tiny_tokenizer()
    t.add_tokens(["<|im_start|>", "<|im_end|>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"],
                 special_tokens=True)
    t.chat_template = template
    spans = trained_spans(t, tokenize_sft({"messages": CONVERSATION}, t, 256))
    think = "<think>\n\n</think>\n\n" if template == QWEN3 else ""
    assert spans == [f"the food is good{ends}", f"{think}great service{ends}"]
    from alignkit.data.preference_tokens import tokenize_completion

    prompt, completion = tokenize_completion(CONVERSATION[:4], "fine", t, 256, True)  # a pair's, a prompt with a turn
    assert t.decode(completion) == f"{think}fine{ends}" and "the food is good" in t.decode(prompt)


def test_template_without_end_token_gets_eos(tok):
    t = tiny_tokenizer()
    t.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                       "{% if add_generation_prompt %}assistant: {% endif %}")
    ex = tokenize_sft({"prompt": "hi", "completion": "the food"}, t, 64)
    assert trained_spans(t, ex) == ["the food\n" + t.eos_token]
    assert ex["input_ids"].count(t.eos_token_id) == 1
    already = tokenize_sft({"prompt": "hi", "completion": "the food" + t.eos_token}, t, 64)  # one EOS, not two
    assert already["input_ids"] == ex["input_ids"]


def test_messages_need_a_chat_template(tmp_path, tok):
    path = write_lines(tmp_path / "m.jsonl", ["", json.dumps({"messages": CONVERSATION[:3]})])
    message = error_of(load_sft_dataset, path, tok, 64, chat_template=False)
    assert message.startswith(f"{path}:2: a messages row needs a chat template, but data.chat_template is false")
    bare = tiny_tokenizer()
    bare.chat_template = None
    message = error_of(load_sft_dataset, path, bare, 64, chat_template=True)
    assert message.startswith(f"{path}:2: a messages row needs a chat template, but this tokenizer has none")
    rows = write_lines(tmp_path / "p.jsonl", ['{"prompt": "a", "completion": " b"}'])
    assert trained_spans(bare, load_sft_dataset(rows, bare, 64)[0]) == [" b" + bare.eos_token]  # plain fallback


def test_missing_pad_token_does_not_crash(tok):
    t = tiny_tokenizer()
    t.pad_token = None
    ex = tokenize_sft({"prompt": "a", "completion": " b"}, t, 16, chat_template=True)
    batch = SFTCollator(t.pad_token_id)([ex, {"input_ids": [5], "labels": [IGNORE_INDEX]}])
    assert batch["input_ids"][1, 1:].eq(0).all()


def test_truncation_keeps_prompt_start_and_drops_rows_without_targets(tmp_path, tok, caplog):
    row = {"prompt": "review the food", "completion": " " + " ".join(["good"] * 40)}
    full = tokenize_sft(row, tok, 512, chat_template=False)
    cut = tokenize_sft(row, tok, 10, chat_template=False)
    assert cut["input_ids"] == full["input_ids"][:10] and cut["labels"] == full["labels"][:10]
    k = first_target(full)
    assert tokenize_sft(row, tok, k, chat_template=False) is None  # only prompt tokens fit
    assert tokenize_sft(row, tok, k + 1, chat_template=False) is not None
    long_prompt = {"prompt": " ".join(["review"] * 50), "completion": " good"}
    path = write_lines(tmp_path / "t.jsonl", [json.dumps(r) for r in [long_prompt, row, long_prompt, row]])
    with caplog.at_level(logging.WARNING, logger="alignkit.data.sft"):
        examples = load_sft_dataset(path, tok, 20, chat_template=False)
    assert len(examples) == 2 and all(len(e["input_ids"]) == 20 for e in examples)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "dropped 2 of 4 rows" in warnings[0]
    only_long = write_lines(tmp_path / "long.jsonl", [json.dumps(long_prompt)] * 3)
    assert "all 3 rows have no completion token left" in error_of(load_sft_dataset, only_long, tok, 20, False)


def test_collator_right_pads_and_counts_targets():
    examples = [{"input_ids": [5, 6, 7, 8], "labels": [-100, -100, 7, 8]},
                {"input_ids": [9, 10], "labels": [-100, 10]}]
    batch = SFTCollator(pad_token_id=1)(examples)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8], [9, 10, 1, 1]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, -100, 7, 8], [-100, 10, -100, -100]]
    assert all(v.dtype == torch.long and v.shape == (2, 4) for v in batch.values())
    assert num_target_tokens(batch) == 3 == num_target_tokens(examples)
    assert SFTCollator(0, pad_to_multiple_of=8)(examples)["input_ids"].shape == (2, 8)


def test_pack_masks_document_boundaries():
    docs = [{"input_ids": [10, 11, 12], "labels": [10, 11, 12]},  # no prompt: first label must still be masked
            {"input_ids": [20, 21, 22, 23], "labels": [-100, -100, 22, 23]},
            {"input_ids": [30, 31, 32], "labels": [-100, 31, 32]}]
    blocks = pack(docs, 4)
    assert [b["input_ids"] for b in blocks] == [[10, 11, 12, 20], [21, 22, 23, 30], [31, 32]]
    labels = [label for b in blocks for label in b["labels"]]
    ids = [i for b in blocks for i in b["input_ids"]]
    for start in (0, 3, 7):  # first token of each document: never a target
        assert labels[start] == IGNORE_INDEX
    assert [i for i, label in zip(ids, labels) if label != IGNORE_INDEX] == [11, 12, 22, 23, 32]  # 31 starts a block
    assert pack([{"input_ids": [1, 2], "labels": [-100, -100]}], 4) == []


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_a_packed_document_trains_as_it_would_alone(arch):
    """Packed documents attended to the documents before them in their block (and GPT-2's learned positions
    ran on across them): a document's per-token losses depended on its neighbours."""
    from alignkit.algorithms.sft import SFT
    from alignkit.models.tiny import tiny_gpt2, tiny_llama

    torch.manual_seed(0)
    model = (tiny_llama if arch == "llama" else tiny_gpt2)().eval()
    docs = [{"input_ids": ids, "labels": [-100, *ids[1:]]}
            for ids in (torch.randint(5, 500, (n,)).tolist() for n in (7, 5, 9, 6))]
    blocks = pack(docs, 16)  # 27 tokens: [7 + 5 + 4 of 9], [5 of 9 + 6], the second block padded
    assert [b["position_ids"] for b in blocks] == [[*range(7), *range(5), *range(4)], [4, 5, 6, 7, 8, *range(6)]]
    batch = SFTCollator(0)(blocks)
    assert batch["position_ids"][1, 11:].tolist() == [0, 1, 2, 3, 4]  # the padding: a sequence of its own

    def token_losses(logits, ids):
        return torch.nn.functional.cross_entropy(logits[0, :-1], torch.tensor(ids[1:]), reduction="none")

    captured = []
    model.register_forward_hook(lambda module, args, out: captured.append(out.logits))
    with torch.no_grad():
        SFT(0).loss(model, batch, 1.0)  # the stage's own forward of the packed batch
        packed = captured.pop()
        alone = [token_losses(model(input_ids=torch.tensor([d["input_ids"]])).logits, d["input_ids"]) for d in docs]
    second = token_losses(packed[:1, 7:12], docs[1]["input_ids"])  # document 2 sits at 7..11 of block 1
    last = token_losses(packed[1:, 5:11], docs[3]["input_ids"])
    assert torch.allclose(second, alone[1], atol=1e-5) and torch.allclose(last, alone[3], atol=1e-5)


def test_load_sft_dataset_packing_and_formats(tmp_path, tok):
    rows = [{"prompt": f"review {w}", "completion": f" {w} is good"} for w in ["food", "service", "the food"] * 4]
    path = str(write_jsonl(tmp_path / "sft.jsonl", rows))
    examples = load_sft_dataset(path, tok, 64, chat_template=True)
    assert len(examples) == 12 and set(examples[0]) == {"input_ids", "labels"}
    packed = load_sft_dataset(path, tok, 32, chat_template=True, packing=True)
    assert all(len(b["input_ids"]) == 32 for b in packed[:-1])
    assert sum(len(b["input_ids"]) for b in packed) == sum(len(e["input_ids"]) for e in examples)
    # max_rows counts rows, not packed blocks (data.max_rows=4 trained on 4 blocks of about 13 rows)
    first4 = load_sft_dataset(path, tok, 32, chat_template=True, packing=True, max_rows=4)
    assert sum(len(b["input_ids"]) for b in first4) == sum(len(e["input_ids"]) for e in examples[:4])
    pd = pytest.importorskip("pandas")
    pd.DataFrame(rows).to_parquet(tmp_path / "sft.parquet")
    assert load_sft_dataset(tmp_path / "sft.parquet", tok, 64) == examples


def test_conversation_opening_with_assistant_and_rejected_conversations(tok, chatml_tok):
    opening = [{"role": "assistant", "content": "welcome to the review desk"}, {"role": "user", "content": "hi"}]
    assert trained_spans(tok, tokenize_sft({"messages": opening}, tok, 64)) == [
        "welcome to the review desk" + tok.eos_token]
    assert trained_spans(chatml_tok, tokenize_sft({"messages": opening}, chatml_tok, 64)) == [
        "welcome to the review desk<|im_end|>"]
    strict = tiny_tokenizer()
    strict.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}"
                            "{{ raise_exception('System role not supported') }}{% endif %}{{ m['content'] }}{% endfor %}")
    message = error_of(tokenize_sft, {"messages": CONVERSATION}, strict, 64, True, where="d.jsonl:3")
    assert message.startswith("d.jsonl:3: the tokenizer's chat template rejected this conversation "
                              "(System role not supported)")


def test_import_is_light():
    import subprocess
    import sys

    code = "import sys, alignkit.data, alignkit.data.jsonl; print(sorted({'torch', 'transformers', 'datasets'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_null_columns_of_the_other_shape_are_ignored(tmp_path):
    path = write_lines(tmp_path / "mixed.jsonl", [
        '{"prompt": "a", "completion": "b", "messages": null}',
        '{"prompt": null, "completion": null, "messages": [{"role": "user", "content": "q"}, '
        '{"role": "assistant", "content": "r"}]}',
    ])
    assert len(read_rows(path, SFT_SCHEMA)) == 2
    tok = tiny_tokenizer()
    with_template = load_sft_dataset(path, tok, 64, chat_template=True)
    assert [trained_spans(tok, ex) for ex in with_template] == [["b" + tok.eos_token], ["r" + tok.eos_token]]
    assert "a messages row needs a chat template" in error_of(load_sft_dataset, path, tok, 64, chat_template=False)
