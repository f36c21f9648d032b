"""The demo pipeline end to end on tiny random models (the same code path as `make demo`)."""

import json

from conftest import make_sft_rows, write_jsonl

from alignkit.tasks.demo import DemoConfig, run_demo


def test_demo_pipeline_on_tiny_models(tiny_llama_dir, tmp_path, capsys):
    sft = write_jsonl(tmp_path / "sft.jsonl", make_sft_rows(32, seed=0))
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": r["prompt"]} for r in make_sft_rows(16, seed=1)])
    held_out = write_jsonl(tmp_path / "eval.jsonl", [{"prompt": r["prompt"]} for r in make_sft_rows(4, seed=2)])
    cfg = DemoConfig(model=str(tiny_llama_dir), reward_backbone=str(tiny_llama_dir), sft_data=str(sft),
                     prompts=str(prompts), eval_prompts=str(held_out), output_dir=str(tmp_path / "demo"),
                     max_new_tokens=6, sft_steps=2, rm_prompts=8, k=3, rm_epochs=1, ppo_steps=1, grpo_steps=1,
                     dpo_steps=1, best_of_n=2, eval_prompts_n=4, gold="builtins:len", label_ceiling=0.7)
    report = run_demo(cfg)
    out = capsys.readouterr().out
    root = tmp_path / "demo"
    html = (root / "report.html").read_text()
    assert report.endswith("report.html") and "data:image/png;base64," in html
    labels = [json.loads(line) for line in (root / "labels" / "rankings.jsonl").read_text().splitlines()]
    assert len(labels) == 8 and all(sorted(r["ranking"]) == [0, 1, 2] for r in labels)
    for method in ("sft", "ppo", "grpo", "dpo"):
        metrics = json.loads((root / method / "eval" / "final.json").read_text())["metrics"]
        assert {"reward/gold", "reward/proxy", "kl", "text/distinct-2", "perplexity"} <= set(metrics), method
        assert method in out  # a row of the summary table
    sft_eval = json.loads((root / "sft" / "eval" / "final.json").read_text())["metrics"]
    assert abs(sft_eval["kl"]) < 1e-4  # the SFT policy is its own reference
    # Re-running skips every finished stage.
    run_demo(cfg)
    assert capsys.readouterr().out.count("(skipped:") >= 12


def test_demo_output_dir_settings_and_fresh(tmp_path):
    """A re-run with other settings reused the finished stages silently; --fresh deleted any output_dir (the
    current directory with output_dir=.), and a kill during its deletion left half-deleted stages that counted
    as done."""
    import pytest

    from alignkit.errors import UserError
    from alignkit.tasks.demo import SETTINGS, _start

    root = tmp_path / "demo"
    _start(DemoConfig(output_dir=str(root), grpo_steps=5), root)  # e.g. a run whose SFT then failed
    _start(DemoConfig(output_dir=str(root)), root)  # no stage finished: other settings are fine (were refused)
    (root / "sft" / "model").mkdir(parents=True)
    _start(DemoConfig(output_dir=str(root)), root)  # same settings: the stages are reused
    assert (root / "sft").is_dir()
    with pytest.raises(UserError, match=r"other settings \(grpo_steps 12 -> 3\).*add --fresh"):
        _start(DemoConfig(output_dir=str(root), grpo_steps=3), root)
    (tmp_path / ".demo.deleting").mkdir()  # a --fresh that was killed while deleting
    _start(DemoConfig(output_dir=str(root), grpo_steps=3, fresh=True), root)
    assert not (root / "sft").exists() and not (tmp_path / ".demo.deleting").exists()
    assert "grpo_steps: 3" in (root / SETTINGS).read_text()
    mine = tmp_path / "thesis"
    mine.mkdir()
    (mine / "chapter1.tex").write_text("x")
    for fresh in (True, False):
        with pytest.raises(UserError, match="holds files but no demo.yaml"):
            _start(DemoConfig(output_dir=str(mine), fresh=fresh), mine)
    assert (mine / "chapter1.tex").is_file()


def test_demo_refuses_bad_settings_before_writing_anything(tmp_path, capsys):
    """sft_steps=0 trained a whole epoch; k=1, label_ceiling=1.5 and gold=nosuch failed after SFT and the rollout,
    with demo.yaml written, so the corrected re-run was refused; sft_lr=-1 was a traceback."""
    from alignkit.cli import main

    out = tmp_path / "demo"
    for bad, message in (("sft_steps=0", "sft_steps must be in [1, inf), got 0"), ("k=1", "k must be in [2, inf)"),
                         ("label_ceiling=1.5", "label_ceiling must be in (0.5, 1), got 1.5"),
                         ("sft_lr=-1", "sft_lr must be in (0, inf), got -1.0"), ("kl_beta=nan", "kl_beta must be in"),
                         ("gold=nosuch", "unknown judge 'nosuch'"), ("prompts=nope.jsonl", "prompts: file not found"),
                         ("max_new_tokens=0", "max_new_tokens must be in [1, inf)")):
        assert main(["demo", f"output_dir={out}", bad]) == 2
        assert message in capsys.readouterr().err
        assert not out.exists()
