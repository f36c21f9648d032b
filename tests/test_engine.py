"""The training engine: per-token accumulation, DDP equivalence, kill-and-resume, SFT learning."""

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from alignkit.algorithms.sft import SFT
from alignkit.data.sft import load_sft_dataset
from alignkit.engine.config import TrainConfig
from alignkit.engine.loop import Engine
from alignkit.errors import UserError
from alignkit.losses.sft import sft_loss
from alignkit.models.tiny import tiny_gpt2, tiny_llama, tiny_tokenizer

from conftest import make_sft_rows, write_jsonl

CLI = [sys.executable, "-m", "alignkit.cli"]


def test_sft_loss_hand_computed():
    # vocab 2, uniform logits at t=0 -> log p = log(1/2); logits [0, ln 3] at t=1 -> p(token 1) = 3/4.
    logits = torch.tensor([[[0.0, 0.0], [0.0, math.log(3.0)], [5.0, 5.0]]])
    labels = torch.tensor([[-100, 0, 1]])  # labels[t] is predicted by logits[t-1]
    loss, m = sft_loss(logits, labels)
    expected = -(math.log(0.5) + math.log(0.75)) / 2
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert m["tokens"] == 2
    loss_n, _ = sft_loss(logits, labels, num_tokens=8)  # normalised by a global token count
    assert loss_n.item() == pytest.approx(expected * 2 / 8, abs=1e-6)


def _sft_rows(tmp_path, n=8):
    tok = tiny_tokenizer()
    path = write_jsonl(tmp_path / "rows.jsonl", make_sft_rows(n))
    return tok, load_sft_dataset(str(path), tok, 64, True, False)


def test_accumulation_matches_one_batch(tmp_path):
    """4 micro-batches of 2 give the same loss and gradients as 1 batch of 8 (per-token normalisation)."""
    tok, rows = _sft_rows(tmp_path)
    assert len({len(r["input_ids"]) for r in rows}) > 1, "rows must differ in length for this test to bite"
    grads, losses = [], []
    for micro in (2, 8):
        engine = Engine(TrainConfig(batch_size=8, micro_batch_size=micro, report_to=[], precision="fp32"),
                        tmp_path / f"run{micro}")
        model = tiny_llama(seed=3).train().to(engine.accelerator.device)
        assert engine.accumulation == 8 // micro
        loss, _ = engine.accumulate(model, SFT(tok.pad_token_id), rows)
        losses.append(loss.item())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-5), name
    # A per-micro-batch mean (the common bug) would differ: check the test can tell (on the CPU).
    model = tiny_llama(seed=3).train()
    naive = sum(sft_loss(model(**SFT(tok.pad_token_id).prepare(rows[i : i + 2])).logits,
                         SFT(tok.pad_token_id).prepare(rows[i : i + 2])["labels"])[0].item() for i in range(0, 8, 2)) / 4
    assert abs(naive - losses[1]) > 1e-4


def test_engines_of_different_precision_in_one_process(tmp_path):
    """accelerate keeps one precision per process; each Engine sets its own (a pipeline runs several)."""
    first = Engine(TrainConfig(report_to=[], precision="bf16"), tmp_path / "a")
    assert first.accelerator.mixed_precision == "bf16"
    second = Engine(TrainConfig(report_to=[], precision="fp32"), tmp_path / "b")
    assert second.accelerator.mixed_precision == "no"


class _Broken(SFT):
    """SFT whose loss is NaN (`value`), or finite with a NaN gradient (`gradient`)."""

    def __init__(self, pad_id, how):
        super().__init__(pad_id)
        self.how = how

    def loss(self, model, batch, normaliser):
        loss, m = super().loss(model, batch, normaliser)
        if self.how == "value":
            return loss * float("nan"), m
        first = next(model.parameters())
        return loss + torch.sqrt(first.abs().sum() * 0.0), m  # adds 0; d sqrt(u) / du at 0 is inf, times 0: NaN


@pytest.mark.parametrize("how, what", [("value", "non-finite loss"), ("gradient", "non-finite grad_norm")])
def test_non_finite_step_stops_before_the_update(tmp_path, how, what):
    tok, rows = _sft_rows(tmp_path)
    engine = Engine(TrainConfig(batch_size=8, micro_batch_size=8, report_to=[], precision="fp32"), tmp_path / "run")
    model = tiny_llama(seed=3).train().to(engine.accelerator.device)
    optimizer, scheduler = engine.make_optimizer(model, 4)
    engine.train_step(model, SFT(tok.pad_token_id), rows, optimizer, scheduler)  # one good step first
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(UserError, match=f"{what} .* at optimiser step 2: stopped before updating"):
        engine.train_step(model, _Broken(tok.pad_token_id, how), rows, optimizer, scheduler)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n


class _RowMean:
    """Each row is (x, kind); the metric `kind` is a (sum, count) mean of x over the rows of kind 1."""

    def units(self, row):
        return 1

    def prepare(self, rows):
        return {"x": torch.tensor([float(x) for x, _ in rows]), "kind": torch.tensor([k for _, k in rows])}

    def loss(self, model, batch, normaliser):
        loss = model(batch["x"].unsqueeze(-1)).sum() / normaliser
        ones = batch["kind"] == 1
        return loss, {"kind": ((batch["x"] * ones).sum(), ones.sum()), "never": (torch.tensor(0.0), 0),
                      "x": batch["x"].sum() / normaliser}


def test_a_metric_given_as_sum_and_count_is_averaged_over_the_counted_rows(tmp_path):
    engine = Engine(TrainConfig(batch_size=6, micro_batch_size=2, report_to=[], precision="fp32"), tmp_path / "run")
    rows = [(1.0, 0), (3.0, 0), (2.0, 1), (5.0, 0), (4.0, 1), (9.0, 1)]  # the first micro-batch counts no row
    _, metrics = engine.accumulate(torch.nn.Linear(1, 1), _RowMean(), rows)
    assert metrics["kind"] == pytest.approx((2 + 4 + 9) / 3)  # not a mean of the micro-batches' means
    assert metrics["x"] == pytest.approx(24 / 6)
    assert "never" not in metrics  # counted no row at all: not logged as 0


def test_metrics_lines_are_strict_json(tmp_path):
    """A NaN metric (an RL run's gold monitor, say) is written as null: Python's NaN token is not JSON."""
    from accelerate import Accelerator

    from alignkit.engine.logging import RunLogger

    with RunLogger(Accelerator(cpu=True), tmp_path, total_steps=1, start_step=0, desc="t") as logger:
        logger.log(1, {"loss": 0.5, "gold_mean": float("nan"), "kl": torch.tensor(float("inf"))})

    def refuse(token):
        raise ValueError(f"not strict JSON: {token}")

    line = json.loads((tmp_path / "metrics.jsonl").read_text(), parse_constant=refuse)
    assert line["gold_mean"] is None and line["kl"] is None and line["loss"] == 0.5


def test_a_resumed_run_uses_its_own_learning_rate(tmp_path):
    """The checkpoint's optimiser and scheduler states carried the first run's lr: a resumed run that changed
    train.lr was warned about the change and kept training at the old rate."""
    tok, rows = _sft_rows(tmp_path)
    base = dict(batch_size=8, micro_batch_size=8, report_to=[], precision="fp32", schedule="linear",
                warmup_ratio=0.0, save_every=1)
    for extra in ({"max_steps": 2, "lr": 1e-5}, {"max_steps": 4, "lr": 1e-3, "resume": True}):
        Engine(TrainConfig(**base, **extra), tmp_path / "run").fit(tiny_llama(seed=3), SFT(tok.pad_token_id), rows)
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    lrs = {line["step"]: line["lr"] for line in lines if "lr" in line}
    # linear decay over the new 4 steps from the new base: step 3 (index 2) trains at 1e-3 * 2/4, step 4 at 1e-3 * 1/4
    assert lrs[3] == pytest.approx(1e-3 * 2 / 4) and lrs[4] == pytest.approx(1e-3 * 1 / 4)
    assert lrs[1] == pytest.approx(1e-5)


def test_optimiser_conventions_of_transformers_trainer(tmp_path):
    """Warm-up steps rounded down (a ratio of 0.05 of 10 steps warmed up for 0 steps; the Trainer takes 1), and weight
    decay on biases and norm weights (the Trainer decays neither)."""
    engine = Engine(TrainConfig(report_to=[], precision="fp32", warmup_ratio=0.05, weight_decay=0.1), tmp_path / "r")
    model = tiny_gpt2()  # biases and LayerNorms
    optimizer, scheduler = engine.make_optimizer(model, 10)
    assert scheduler.get_last_lr()[0] == 0.0  # step 1 is the first of 1 warm-up step
    decayed, plain = optimizer.param_groups
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)].rsplit(".", 1)[-1] for p in plain["params"]} == {"weight", "bias"}  # LayerNorm weights
    assert all(p.dim() < 2 for p in plain["params"]) and all(p.dim() == 2 for p in decayed["params"])
    assert len(decayed["params"]) + len(plain["params"]) == len(list(model.parameters()))


def test_fp16_on_a_cpu_is_refused(tmp_path):
    with pytest.raises(UserError, match="precision=fp16 needs a GPU"):  # accelerate ran it in fp32 without a word
        Engine(TrainConfig(report_to=[], precision="fp16"), tmp_path / "r")


def test_tokens_per_s_leaves_out_evaluation_time(tmp_path, monkeypatch):
    """Evaluation after a logged step was charged to the next one: its tokens_per_s read 100x too low."""
    tok, rows = _sft_rows(tmp_path)
    engine = Engine(TrainConfig(batch_size=8, micro_batch_size=8, max_steps=4, eval_every=2, report_to=[],
                                precision="fp32"), tmp_path / "run")
    evaluate, offset = engine.evaluate, [0.0]

    def slow_evaluate(*args):  # 1000 s on the logger's clock: no timing noise of a loaded machine can hide it
        offset[0] += 1000.0
        return evaluate(*args)

    monkeypatch.setattr(engine, "evaluate", slow_evaluate)
    monkeypatch.setattr("alignkit.engine.logging.time", SimpleNamespace(perf_counter=lambda: time.perf_counter()
                                                                        + offset[0]))
    engine.fit(tiny_llama(seed=3), SFT(tok.pad_token_id), rows, rows[:8])
    speeds = [json.loads(x)["tokens_per_s"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
              if "tokens_per_s" in x]
    assert min(speeds[2:]) > 0.01 * max(speeds[:2])  # step 3 follows the evaluation of step 2


def _sft_cmd(model_dir, sft_files, out, *extra):
    train, evalf = sft_files
    return CLI + ["sft", f"model.path={model_dir}", f"data.train={train}", f"data.eval={evalf}",
                  f"output_dir={out}", "train.lr=1e-3", "train.report_to=[]", "train.batch_size=8",
                  "data.max_length=64", *extra]


def _run(cmd, env=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


def _weights(run_dir):
    return load_file(Path(run_dir) / "model" / "model.safetensors")


def test_kill_and_resume_equals_uninterrupted(tiny_llama_dir, sft_files, tmp_path):
    args = ["train.max_steps=60", "train.save_every=5", "train.micro_batch_size=4"]
    full = _run(_sft_cmd(tiny_llama_dir, sft_files, tmp_path / "full", *args))
    assert full.returncode == 0, full.stderr

    killed_dir = tmp_path / "killed"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(_sft_cmd(tiny_llama_dir, sft_files, killed_dir, *args), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (killed_dir / "checkpoints" / "step-5").exists():
        assert proc.poll() is None and time.time() < deadline, "run ended before its first checkpoint"
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed_dir / "model").exists(), "the run finished before it was killed; the test proves nothing"

    resumed = _run(_sft_cmd(tiny_llama_dir, sft_files, killed_dir, *args, "train.resume=true"))
    assert resumed.returncode == 0, resumed.stderr
    a, b = _weights(tmp_path / "full"), _weights(killed_dir)
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    steps = [json.loads(line)["step"] for line in (killed_dir / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == list(range(1, 61)), "metrics.jsonl should read as one clean run after resume"


def test_a_resumed_run_rewrites_its_tensorboard_steps(tiny_llama_dir, sft_files, tmp_path):
    """TensorBoard showed the steps logged after the checkpoint twice (the killed run's and the resumed run's)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    args = ["train.max_steps=4", "train.save_every=2", "train.report_to=[tensorboard]"]
    assert _run(_sft_cmd(tiny_llama_dir, sft_files, out, *args)).returncode == 0
    shutil.rmtree(out / "model")  # as if killed after logging step 4, before the save (the last checkpoint: 2)
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-2"]
    resumed = _run(_sft_cmd(tiny_llama_dir, sft_files, out, *args, "train.resume=true"))
    assert resumed.returncode == 0, resumed.stderr
    events = EventAccumulator(str(out / "alignkit"))
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == [1, 2, 3, 4]


def test_failed_resume_keeps_the_run_config(tiny_llama_dir, sft_files, tmp_path):
    """A resume whose checkpoint does not fit the model (here: LoRA asked of a full fine-tuning run) stops
    before the run's config.yaml is rewritten."""
    from alignkit.algorithms.sft import SFTConfig, run_sft
    from alignkit.config import load_config

    out = tmp_path / "run"
    args = _sft_cmd(tiny_llama_dir, sft_files, out, "train.max_steps=2", "train.save_every=1")[len(CLI) + 1:]
    run_sft(load_config(SFTConfig, None, args))
    saved = (out / "config.yaml").read_text()
    with pytest.raises(UserError, match="checkpoint does not match the model"):
        run_sft(load_config(SFTConfig, None, [*args, "train.resume=true", "lora.r=4"]))
    assert (out / "config.yaml").read_text() == saved


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_processes_match_single(tiny_llama_dir, sft_files, tmp_path):
    """Two processes (gloo, on the CPU also where one GPU is present) train like one."""
    args = ["train.max_steps=4", "train.micro_batch_size=4"]
    cpu = {"CUDA_VISIBLE_DEVICES": ""}
    single = _run(_sft_cmd(tiny_llama_dir, sft_files, tmp_path / "single", *args), cpu)
    assert single.returncode == 0, single.stderr
    ddp_cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
               "-m", "alignkit.cli"] + _sft_cmd(tiny_llama_dir, sft_files, tmp_path / "ddp", *args)[len(CLI):]
    ddp = _run(ddp_cmd, cpu)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    # one main process: two ranks that each trained alone (not distributed) would both log and both save
    logged = [json.loads(line)["step"] for line in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert logged == [1, 2, 3, 4, 4], logged  # four training lines and the final eval line
    a, b = _weights(tmp_path / "single"), _weights(tmp_path / "ddp")
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5
    init = load_file(Path(tiny_llama_dir) / "model.safetensors")
    assert max((a[k] - init[k]).abs().max().item() for k in a) > 1e-3, "training must have moved the weights"


def test_sft_learns(tiny_llama_dir, sft_files, tmp_path):
    out = tmp_path / "full"
    res = _run(_sft_cmd(tiny_llama_dir, sft_files, out, "train.epochs=4", "train.lr=3e-3", "train.eval_every=8"))
    assert res.returncode == 0, res.stderr
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if "eval/loss" in line]
    assert [e["step"] for e in evals] == [8, 16, 24, 32]
    assert evals[-1]["eval/loss"] < evals[0]["eval/loss"] - 1.0, evals
    assert evals[-1]["eval/ppl"] == pytest.approx(math.exp(evals[-1]["eval/loss"]), rel=1e-6)
    assert (out / "config.yaml").is_file()
    assert not list(out.glob(".*tmp*")), "no temp dirs may be left behind"


def test_lora_sft_saves_adapter_and_merged_model(tiny_llama_dir, sft_files, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "lora"
    res = _run(_sft_cmd(tiny_llama_dir, sft_files, out, "train.max_steps=4", "lora.r=8", "train.lr=1e-2",
                        "train.report_to=[tensorboard]", "model.dtype=float32"))  # the merge, exactly
    assert res.returncode == 0, res.stderr
    assert list(out.rglob("events.out.tfevents.*")), "TensorBoard events should be written"
    umask = os.umask(0)
    os.umask(umask)
    for saved in ("model", "adapter"):  # readable by others as the umask allows (mkdtemp made them 0700)
        assert (out / saved).stat().st_mode & 0o777 == 0o777 & ~umask
        assert all(f.stat().st_mode & 0o777 == 0o666 & ~umask for f in (out / saved).iterdir())
    merged = AutoModelForCausalLM.from_pretrained(out / "model")
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), out / "adapter")
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, adapted(ids).logits, atol=1e-5)
        with adapted.disable_adapter():
            assert not torch.allclose(merged(ids).logits, adapted(ids).logits, atol=1e-4)


def test_a_failed_run_starts_again_in_place(tmp_path):
    """Only a saved model or checkpoint makes output_dir a run to protect: a run that stopped before either
    (e.g. on a NaN reward) left config.yaml and metrics.jsonl, which blocked the corrected re-run."""
    from alignkit.algorithms.sft import check_output_dir

    (tmp_path / "config.yaml").write_text("train: {}\n")
    (tmp_path / "metrics.jsonl").write_text("")
    check_output_dir(tmp_path, resume=False)
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(UserError, match=r"already holds a run \(checkpoints/\)"):
        check_output_dir(tmp_path, resume=False)
    check_output_dir(tmp_path, resume=True)


def test_damaged_checkpoints(tmp_path):
    """A truncated checkpoint file is a one-line error naming the checkpoint (was a safetensors traceback); a
    step-N left without its state.json (not a checkpoint) is replaced when that step is saved again (the
    rename failed with 'Directory not empty')."""
    tok, rows = _sft_rows(tmp_path)
    run = tmp_path / "run"

    def fit(resume):
        cfg = TrainConfig(batch_size=4, micro_batch_size=4, max_steps=3, save_every=1, resume=resume, report_to=[],
                          precision="fp32")
        Engine(cfg, run).fit(tiny_llama(seed=3), SFT(tok.pad_token_id), rows)

    fit(False)
    step2 = run / "checkpoints" / "step-2"
    (step2 / "state.json").unlink()  # step-2 no longer counts: resume from step-1, then save step 2 anew
    fit(True)
    assert (step2 / "state.json").is_file()
    weights = step2 / "trainable.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(UserError, match=r"step-2: cannot resume from this checkpoint \(SafetensorError: .*\); "
                                        "delete it to resume from the one before"):
        fit(True)


def _fit(run, rows, pad_id, model=None, desc="train", **cfg):
    """One Engine.fit of a tiny Llama on `rows` into `run` (seeded; fp32; a checkpoint after every step)."""
    cfg = {"batch_size": 4, "micro_batch_size": 4, "max_steps": 3, "save_every": 1, "report_to": [],
           "precision": "fp32", **cfg}
    return Engine(TrainConfig(**cfg), run).fit(model or tiny_llama(seed=3), SFT(pad_id), rows, desc=desc,
                                               config={"train": cfg})


def test_resume_refuses_checkpoints_that_do_not_fit_the_run(tmp_path):
    """A checkpoint past the new last step was resumed, and the later model saved as the shorter run's; a LoRA
    rank changed on resume was called a damaged checkpoint ('delete it'); another stage's checkpoint was resumed;
    a finished run without checkpoints trained again from scratch."""
    from alignkit.models.load import LoraConfig, add_lora

    tok, rows = _sft_rows(tmp_path, n=16)
    run = tmp_path / "run"
    _fit(run, rows, tok.pad_token_id, max_steps=4)  # checkpoints step-1 .. step-3
    with pytest.raises(UserError, match=r"step-3 is step 3, past the run's last step 2 \(train.max_steps\)"):
        _fit(run, rows, tok.pad_token_id, max_steps=2, resume=True)
    with pytest.raises(UserError, match=r"step-3 is a checkpoint of a 'train' run, not 'dpo'; pick another"):
        _fit(run, rows, tok.pad_token_id, max_steps=4, resume=True, desc="dpo")
    with pytest.raises(UserError, match=r"train.batch_size: 4 in the run being resumed .*, 8 now; a resumed run "
                                        "keeps it"):  # step 4 of batch 8 skipped rows 12-16 of the epoch
        _fit(run, rows, tok.pad_token_id, max_steps=4, batch_size=8, micro_batch_size=8, resume=True)
    lora = tmp_path / "lora"
    _fit(lora, rows, tok.pad_token_id, add_lora(tiny_llama(seed=3), LoraConfig(r=4)))
    with pytest.raises(UserError, match=r"step-2: checkpoint does not match the model \('.*lora_A.*' is \(4, \d+\) "
                                        r"there, \(8, \d+\) here\); check lora/model"):
        _fit(lora, rows, tok.pad_token_id, add_lora(tiny_llama(seed=3), LoraConfig(r=8)), resume=True)
    (tmp_path / "done" / "model").mkdir(parents=True)  # a finished run of save_every=0
    with pytest.raises(UserError, match="holds a finished model and no checkpoint to continue from"):
        _fit(tmp_path / "done", rows, tok.pad_token_id, resume=True)


def test_training_clears_an_earlier_finish_and_killed_saves(tmp_path, monkeypatch, caplog):
    """A finished run resumed for more steps and killed kept the first finish's model/ (and, with LoRA, an adapter/
    of the new run beside it), the temp dirs of a killed save stayed forever, and a torn line in metrics.jsonl made
    the resume a JSON traceback."""
    tok, rows = _sft_rows(tmp_path, n=16)
    run = tmp_path / "run"
    _fit(run, rows, tok.pad_token_id)
    for name in ("model", "adapter", ".model.tmp-x1", ".adapter.tmp-x2", "checkpoints/.tmp-step-9"):
        (run / name).mkdir(parents=True)  # a finished run's outputs, and what killed saves leave
    with (run / "metrics.jsonl").open("a") as f:
        f.write('\n{"step": 3, "lo')  # a blank line, and a line cut short

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(Engine, "train_step", killed)
    with caplog.at_level("WARNING"), pytest.raises(KeyboardInterrupt):
        _fit(run, rows, tok.pad_token_id, max_steps=4, resume=True)
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "config.yaml", "metrics.jsonl"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-1", "step-2"]
    assert "metrics.jsonl: dropped 1 unreadable line(s) (first: line 5)" in caplog.text
    assert [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_checkpoints_keep_the_fp16_loss_scale(tmp_path):
    """fp16's loss scaler (a GPU's) restarted at its initial scale on resume; here a CPU scaler stands in for it."""
    from alignkit.engine.checkpoint import load_checkpoint, save_checkpoint

    scales = []
    for init in (1024.0, 8.0):
        engine = Engine(TrainConfig(report_to=[], precision="fp32"), tmp_path / "run")
        engine.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=init)
        model = tiny_llama(seed=3)
        optimizer, scheduler = engine.make_optimizer(model, 4)
        if init == 1024.0:
            save_checkpoint(engine.accelerator, tmp_path / "run", 1, model, optimizer, scheduler, 1, "train")
        else:
            load_checkpoint(engine.accelerator, tmp_path / "run/checkpoints/step-1", model, optimizer, scheduler,
                            "train")
        scales.append(engine.accelerator.scaler.get_scale())
    assert scales == [1024.0, 1024.0]


def test_a_killed_write_leaves_no_temp_file_in_a_run_directory(tmp_path):
    """atomic_open's temp file (.NAME.XXXX.tmp) of a killed write stayed in the run directory for good: the engine's
    start cleared the model's and checkpoints' temp dirs only."""
    code = ("import os, signal\nfrom alignkit.data.jsonl import atomic_open\n"
            f"with atomic_open({str(tmp_path / 'metrics.jsonl')!r}) as f:\n"
            "    f.write('half')\n    f.flush()\n    os.kill(os.getpid(), signal.SIGKILL)\n")
    assert subprocess.run([sys.executable, "-c", code]).returncode == -signal.SIGKILL
    assert [p.name for p in tmp_path.iterdir()][0].startswith(".metrics.jsonl.")
    Engine(TrainConfig(report_to=[]), tmp_path).begin({}, 0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"]


def test_a_broken_list_override_is_one_line():
    from alignkit.algorithms.sft import SFTConfig
    from alignkit.config import load_config

    with pytest.raises(UserError, match=r"train.adam_betas: expected a list, got '\[0.9,'"):
        load_config(SFTConfig, None, ["train.adam_betas=[0.9,"])


def test_the_trained_model_runs_without_autocast_after_fit(tmp_path):
    """fit returned the model still wrapped in accelerate's autocast: a reward model's normalisation, DPO's final KL
    and later rejection-sampling rounds ran in bf16 where the stage's scoring runs in float32 (mean off by 0.025)."""
    tok, rows = _sft_rows(tmp_path)
    engine = Engine(TrainConfig(batch_size=8, micro_batch_size=8, max_steps=1, report_to=[], precision="bf16"),
                    tmp_path / "run")
    model, _ = engine.fit(tiny_llama(seed=3), SFT(tok.pad_token_id), rows, None)
    plain = tiny_llama(seed=3)
    plain.load_state_dict(model.state_dict())
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.equal(model.eval()(input_ids=ids).logits, plain.eval()(input_ids=ids).logits)
        assert torch.equal(model(input_ids=ids, return_dict=False)[0], plain(input_ids=ids).logits)  # HF's forward
