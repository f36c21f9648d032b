"""`alignkit score`: errors name the file:line of the row, as every other reader's do."""

import json

from alignkit import cli
from alignkit.models.tiny import save_tiny, tiny_llama


def test_a_row_that_has_the_field_is_named_by_file_line(tmp_path, capsys):
    """The clash was named "row 2", counted without the blank line before it; an editor calls it line 3."""
    model = save_tiny(tmp_path / "rm", tiny_llama(num_labels=1))  # a one-label classifier, no alignkit metadata
    capsys.readouterr()  # save_pretrained's progress bar
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"prompt": "p", "completion": "a"}) + "\n\n"
                    + json.dumps({"prompt": "p", "completion": "b", "reward": 1.0}) + "\n")
    assert cli.main(["score", f"model={model}", f"input={rows}"]) == 2
    assert capsys.readouterr().err == (
        f"alignkit score: error: {rows}:3: the row already has a field 'reward', which the scores would overwrite; "
        "name the added field otherwise (field=...)\n")
    assert not (tmp_path / "rows.scored.jsonl").exists()
    out = tmp_path / "scored.jsonl"
    assert cli.main(["score", f"model={model}", f"input={rows}", f"output={out}", "field=rm"]) == 0
    scored = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["completion"], r.get("reward"), isinstance(r["rm"], float)) for r in scored] == [
        ("a", None, True), ("b", 1.0, True)]
