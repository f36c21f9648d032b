"""CLI and config behaviour: help, --print-config, overrides, and one-line errors with exit code 2."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from alignkit.algorithms.sft import SFTConfig
from alignkit.cli import STAGES, main
from alignkit.config import load_config, save_config, to_dict, to_yaml
from alignkit.data.jsonl import check_output
from alignkit.errors import UserError


def test_help_lists_stages(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    for stage in ("sft", "generate", "demo"):
        assert stage in out


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_every_stage_prints_its_config(stage, capsys):
    """`--print-config` needs no settings (required paths are checked when the stage runs)."""
    assert main([*stage.split(), "--print-config"]) == 0
    assert "\n" in capsys.readouterr().out


def test_print_config_is_documented_yaml(capsys):
    import yaml

    assert main(["sft", "--print-config", "train.lr=3e-4", "lora.r=8"]) == 0
    text = capsys.readouterr().out
    assert "# Peak learning rate of AdamW" in text
    data = yaml.safe_load(text)
    assert data["train"]["lr"] == 3e-4 and data["lora"]["r"] == 8
    # the printed YAML loads back to the same config
    assert load_config(SFTConfig, None, []).train.lr == 1e-5


def test_config_file_and_override(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text(to_yaml(load_config(SFTConfig, None, ["train.batch_size=16", "train.micro_batch_size=4"])))
    cfg = load_config(SFTConfig, f, ["train.lr=0.01"])
    assert (cfg.train.batch_size, cfg.train.micro_batch_size, cfg.train.lr) == (16, 4, 0.01)


def test_string_overrides_keep_their_text():
    """YAML read `output_dir=0755` as the octal 493, 1.10 as 1.1 and `no` as false (an error for a string)."""
    for text in ("0755", "1.10", "0x1F", "1_000", ".inf", "no", "true", "runs/x"):
        assert load_config(SFTConfig, None, [f"output_dir={text}"]).output_dir == text
    cfg = load_config(SFTConfig, None, ["data.eval=null", "train.lr=1e-4", "lora.target_modules=q_proj,v_proj"])
    assert (cfg.data.eval, cfg.train.lr, cfg.lora.target_modules) == (None, 1e-4, ["q_proj", "v_proj"])


def test_config_file_strings_keep_their_text(tmp_path):
    """The same in a config file: `output_dir: 0755` was the directory 493; quoted text, numbers, booleans, lists
    and nulls read as before."""
    for text in ("0755", "1.10", "0x1F", "no", "true"):
        f = tmp_path / "c.yaml"
        f.write_text(f"output_dir: {text}\ndata:\n  eval: null\n  packing: yes\ntrain:\n  lr: 1.0e-4\n"
                     "  adam_betas: [0.8, 0.99]\nlora:\n  r: 0x10\n  target_modules: [q_proj, '1']\n")
        cfg = load_config(SFTConfig, f, [])
        assert cfg.output_dir == text and cfg.data.eval is None and cfg.data.packing is True
        assert (cfg.train.lr, cfg.train.adam_betas, cfg.lora.r, cfg.lora.target_modules) == (
            1e-4, [0.8, 0.99], 16, ["q_proj", "1"])
    f.write_text("train: 5\n")
    with pytest.raises(UserError, match="'train' is 5 in the config file"):
        load_config(SFTConfig, f, ["train.lr=1"])
    f.write_text("3: x\n")
    with pytest.raises(UserError, match="unknown config key '3'"):
        load_config(SFTConfig, f, [])


def test_resumed_run_logs_changed_settings(tmp_path, caplog):
    path = tmp_path / "config.yaml"
    save_config(to_dict(load_config(SFTConfig, None, [])), path)
    caplog.clear()
    save_config(to_dict(load_config(SFTConfig, None, ["train.lr=0.01", "train.resume=true"])), path)
    assert [r.getMessage() for r in caplog.records] == [f"{path}: continuing with changed settings: train.lr 1e-05 -> 0.01"]
    assert load_config(SFTConfig, path, []).train.lr == 0.01  # the new settings are the ones kept


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.lrr=1", "unknown config key 'train.lrr'; did you mean 'train.lr'?"),
        ("trian.lr=1", "unknown config key 'trian'; did you mean 'train'?"),
        ("train.batch_size=two", "train.batch_size: expected an integer, got 'two'"),
        ("train.schedule=cubic", "train.schedule: 'cubic' is not one of 'cosine', 'linear', 'constant'"),
        ("train.batch_size=6", "train.batch_size (6) must be a multiple of train.micro_batch_size (8)"),
        ("train.lr=inf", "train.lr must be in (0, inf), got inf"),  # trained to an all-NaN model, exit 0
        ("train.lr=nan", "train.lr must be in (0, inf), got nan"),
        ("train.lr=-1", "train.lr must be in (0, inf), got -1.0"),
        ("train.adam_betas=[2,3]", "train.adam_betas must be in [0, 1), got 2.0"),
        ("train.weight_decay=-1", "train.weight_decay must be in [0, inf), got -1.0"),
        ("train.max_grad_norm=0", "train.max_grad_norm must be in (0, inf), got 0.0"),
        ("train.seed=-1", "train.seed must be in [0, 4294967295], got -1"),
        ("train.log_every=0", "train.log_every must be in [1, inf), got 0"),
        ("data.max_rows=-1", "data.max_rows must be in [1, inf), got -1"),  # dropped the last row
        ("data.max_rows=null", None),  # null stays allowed
        ("data.max_length=1", "data.max_length must be in [2, inf), got 1"),  # said "max_length" at the first row
        ("lora.dropout=2", "lora.dropout must be in [0, 1), got 2.0"),  # was reported as lora.target_modules
        ("lora.alpha=0", "lora.alpha must be in (0, inf), got 0.0"),
    ],
)
def test_bad_config_values(override, message):
    if message is None:
        load_config(SFTConfig, None, [override])
        return
    with pytest.raises(UserError) as e:
        load_config(SFTConfig, None, [override])
    assert str(e.value) == message


@pytest.mark.parametrize(
    "stage, override, message",
    [
        ("grpo", "online.group_size=1", "pg.advantage=grpo compares the samples of one prompt: online.group_size must "
                                        "be >= 2, got 1"),
        ("rloo", "online.group_size=1", "pg.advantage=rloo compares the samples of one prompt: online.group_size must "
                                        "be >= 2, got 1"),
        ("ppo", "kl.beta=-0.1", "kl.beta must be in [0, inf), got -0.1"),
        ("ppo", "kl.target=0", "kl.target must be in (0, inf), got 0.0"),
        ("grpo", "pg.clip_low=1", "pg.clip_low must be in (0, 1), got 1.0"),
        ("reinforce", "pg.baseline_momentum=1", "pg.baseline_momentum must be in [0, 1), got 1.0"),
        ("ppo", "ppo.gamma=0", "ppo.gamma must be in (0, 1], got 0.0"),
        ("ppo", "ppo.lam=1.5", "ppo.lam must be in [0, 1], got 1.5"),
        ("grpo", "sampling.do_sample=false", "sampling.do_sample must be true for RL: the policy gradient and the KL "
                                             "estimate need samples of the policy (greedy decoding gave a GRPO group "
                                             "identical responses: no update)"),
        ("ppo", "reward.no_eos_penalty=nan", "no_eos_penalty must be a finite number or null, got nan"),
        ("ppo", "ppo.critic_model=x", "ppo.critic_model is the trunk of a separate critic: set ppo.critic=separate too "
                                      "(the shared critic is a head on the policy)"),
    ],
)
def test_bad_rl_config_values(stage, override, message):
    from alignkit.algorithms.policy_gradient import GRPOConfig, REINFORCEConfig, RLOOConfig
    from alignkit.algorithms.ppo import PPOConfig

    cls = {"grpo": GRPOConfig, "rloo": RLOOConfig, "reinforce": REINFORCEConfig, "ppo": PPOConfig}[stage]
    with pytest.raises(UserError) as e:
        load_config(cls, None, [override])
    assert str(e.value) == message
    load_config(cls, None, [])  # the defaults pass


def test_a_file_value_under_command_line_keys_is_an_error(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train: 5\n")  # train.lr=... on the command line replaced it without a word
    with pytest.raises(UserError, match="'train' is 5 in the config file, but train.\\* is set on the command line"):
        load_config(SFTConfig, f, ["train.lr=1e-4"])
    f.write_text("train:\n  lr: 0.5\n")
    assert load_config(SFTConfig, f, ["train.batch_size=4", "train.micro_batch_size=4"]).train.lr == 0.5


def test_bad_yaml_names_file_and_line(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("train:\n  lr: [1, 2\n")
    with pytest.raises(UserError, match=r"bad.yaml:\d+: not valid YAML"):
        load_config(SFTConfig, f, [])


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "alignkit.cli", *args], capture_output=True, text=True, timeout=120)


def test_malformed_jsonl_one_line_exit_2(tiny_llama_dir, tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": 3}\n')
    out = tmp_path / "run"
    res = _cli("sft", f"model.path={tiny_llama_dir}", f"data.train={data}", "data.eval=null", f"output_dir={out}")
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in res.stderr
    assert f"{data}:2" in lines[0] and "completion" in lines[0]
    assert not out.exists(), "nothing may be written for a run that failed on its input"


def test_unwritable_outputs_exit_2(tiny_llama_dir, tmp_path):
    """Outputs that cannot be written: one line naming the path (an atomic writer's temp name was shown, or a
    traceback from mkdir)."""
    a_file = tmp_path / "sft.jsonl"
    a_file.write_text('{"prompt": "a", "completion": "b"}\n' * 8)
    res = _cli("sft", f"model.path={tiny_llama_dir}", f"data.train={a_file}", f"output_dir={a_file}/run")
    assert res.returncode == 2 and res.stderr.strip().splitlines()[-1] == (
        f"alignkit sft: error: cannot write {a_file}/run: {a_file} is a file, not a directory")
    rankings = tmp_path / "r.jsonl"
    rankings.write_text('{"prompt": "q", "completions": ["a", "b"], "ranking": [0, 1]}\n')
    for output, why in ((tmp_path, "it is a directory; name a file"),
                        (f"{tmp_path}/pairs/", "it names a directory; name a file"),  # wrote a file 'pairs'
                        (a_file / "p.jsonl", f"{a_file} is a file, not a directory")):
        res = _cli("data", "rankings-to-pairs", f"input={rankings}", f"output={output}")
        assert res.returncode == 2 and res.stderr.strip() == (
            f"alignkit data rankings-to-pairs: error: cannot write {output}: {why}")


def test_an_unwritable_output_is_refused_before_the_work(tiny_llama_dir, tmp_path, monkeypatch):
    """generate, best-of-n, eval, cai and DPO sampled, judged or scored everything, then failed on the output."""
    import os

    from alignkit import cli

    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "a"}\n')
    monkeypatch.setattr("alignkit.rollout.stage.load_tokenizer", lambda *a: pytest.fail("work before the check"))
    monkeypatch.setattr("alignkit.algorithms.best_of_n.load_tokenizer", lambda *a: pytest.fail("work before the check"))
    for args in (["generate", f"model.path={tiny_llama_dir}", f"prompts={prompts}", f"output={prompts}/x.jsonl"],
                 ["best-of-n", f"model.path={tiny_llama_dir}", f"prompts={prompts}", f"output_dir={prompts}/bon"]):
        assert cli.main(args) == 2
    read_only = tmp_path / "ro"
    read_only.mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(read_only) else real(p, mode))
    with pytest.raises(UserError, match=f"cannot write {read_only}/out/x.jsonl: {read_only} is not writable"):
        check_output(read_only / "out" / "x.jsonl")
    monkeypatch.chdir(tmp_path)  # output_dir= wrote the results into the current directory
    assert cli.main(["best-of-n", f"model.path={tiny_llama_dir}", f"prompts={prompts}", "output_dir="]) == 2
    with pytest.raises(UserError, match="^output_dir: empty"):  # a training stage's too (it reached the data)
        load_config(SFTConfig, None, ["output_dir= "])


def test_unknown_key_and_missing_model_exit_2(tmp_path):
    res = _cli("sft", "train.lrr=1")
    assert res.returncode == 2 and "did you mean 'train.lr'" in res.stderr and "Traceback" not in res.stderr
    missing = tmp_path / "no-such-model"
    res = _cli("generate", f"model.path={missing}", "prompts=demo")
    assert res.returncode == 2 and str(missing) in res.stderr and "Traceback" not in res.stderr


MISSING = "alignkit-tests/no-such-model"


@pytest.mark.parametrize("args", [
    ["grpo", f"model.path={MISSING}", "reward.function=builtins:len", "output_dir=OUT"],
    ["rm", f"model.path={MISSING}", "output_dir=OUT"],
    ["score", f"model={MISSING}", "input=OUT.jsonl"],
    ["ppo", "model.path=TINY", "reward.function=builtins:len", "ppo.critic=separate", f"ppo.critic_model={MISSING}",
     "output_dir=OUT"],
])
def test_hub_name_not_available_offline_exit_2(args, tiny_llama_dir, tmp_path, monkeypatch):
    """A name that is no local directory is a hub name; offline and not cached, that is a one-line error (after
    any progress bars of the models that did load), not a traceback."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "run.jsonl").write_text('{"prompt": "a", "completion": "b"}\n')
    res = _cli(*(a.replace("TINY", str(tiny_llama_dir)).replace("OUT", str(tmp_path / "run")) for a in args))
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith(f"alignkit {args[0]}: error: could not load") and f"'{MISSING}'" in last


def test_a_run_directory_given_as_a_model_names_its_model(tiny_llama_dir, tmp_path):
    """A run directory where a model directory belongs (`reward.model=runs/rm`) failed deep in the tokenizer."""
    from alignkit.models.load import load_tokenizer

    run = tmp_path / "run"
    (run / "model").mkdir(parents=True)
    for f in Path(tiny_llama_dir).iterdir():
        (run / "model" / f.name).write_bytes(f.read_bytes())
    with pytest.raises(UserError) as e:
        load_tokenizer(run)
    assert str(e.value) == f"'{run}' is a run directory, not a model; its model is '{run / 'model'}'"


def test_max_length_beyond_the_context_exit_2(tiny_gpt2_dir, tmp_path):
    """GPT-2's learned positions end at 512: longer sequences failed with 'IndexError: index out of range'."""
    data = tmp_path / "sft.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n' * 8)
    res = _cli("sft", f"model.path={tiny_gpt2_dir}", f"data.train={data}", "data.eval=null",
               "data.max_length=100000", f"output_dir={tmp_path / 'run'}")
    assert res.returncode == 2 and res.stderr.strip().splitlines()[-1] == (
        "alignkit sft: error: data.max_length=100000 is more than the model's context (512 positions); lower it")


def test_readme_python_example_runs(tiny_llama_dir, sft_files, tmp_path, monkeypatch):
    """The README's "From Python" block, run as written on a tiny model: it trains and returns the model's directory."""
    import re

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    (block,) = re.findall(r"```python\n(.*?)```", readme, re.S)
    train, evalf = sft_files
    (tmp_path / "my.yaml").write_text(
        f"model: {{path: {tiny_llama_dir}}}\ndata: {{train: {train}, eval: {evalf}, max_length: 64}}\n"
        "train: {max_steps: 2, batch_size: 8, report_to: []}\noutput_dir: run\n")
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(textwrap.dedent(block), "README.md", "exec"), scope)
    assert scope["model_dir"] == Path("run/model") and (tmp_path / "run/model/config.json").exists()
