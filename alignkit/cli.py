"""`alignkit <stage> --config FILE.yaml key=value ...`: parse, call the stage, report.

Bad input (a config key, a data file, a model path) is printed as one line and exits with code 2.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys

from alignkit.errors import UserError
from alignkit.feedback import label_cli  # the labelling app's commands (light: argparse only until one runs)

# stage -> (module, config class, run function, one-line help). Modules are imported only when used,
# so `alignkit --help` stays fast.
STAGES = {
    "sft": ("alignkit.algorithms.sft", "SFTConfig", "run_sft", "supervised fine-tuning on demonstrations"),
    "generate": ("alignkit.rollout.stage", "GenerateConfig", "run_generate", "sample completions for prompts"),
    "rollout": ("alignkit.rollout.k_samples", "RolloutConfig", "run_rollout",
                "sample K completions per prompt into a rankings file for labelling"),
    "label": ("alignkit.feedback.simulated", "LabelConfig", "run_label",
              "simulated labelers: rank completions with a noisy gold judge; people label in the web app: "
              f"alignkit label {'|'.join(label_cli.SUBCOMMANDS)} --help"),
    "data rankings-to-pairs": ("alignkit.data.preferences", "RankingsToPairsConfig", "run_rankings_to_pairs",
                               "expand K-wise rankings to all pairwise comparisons (ties dropped)"),
    "rm": ("alignkit.algorithms.reward_model", "RewardModelConfig", "run_rm",
           "train a reward model (Bradley-Terry or K-wise) and calibrate it"),
    "score": ("alignkit.rewards.reward_model", "ScoreConfig", "run_score", "score a JSONL of prompt/completion rows"),
    "ppo": ("alignkit.algorithms.ppo", "PPOConfig", "run_ppo", "PPO with a value head and a KL penalty in the reward"),
    "grpo": ("alignkit.algorithms.policy_gradient", "GRPOConfig", "run_grpo", "GRPO (Dr. GRPO / DAPO as options)"),
    "rloo": ("alignkit.algorithms.policy_gradient", "RLOOConfig", "run_rloo", "RLOO: leave-one-out baseline, KL in the reward"),
    "reinforce": ("alignkit.algorithms.policy_gradient", "REINFORCEConfig", "run_reinforce",
                  "REINFORCE with a moving-average baseline"),
    "dpo": ("alignkit.algorithms.dpo", "DPOConfig", "run_dpo", "direct preference optimisation: loss=dpo|cdpo|ipo|simpo|orpo|kto"),
    "best-of-n": ("alignkit.algorithms.best_of_n", "BestOfNConfig", "run_best_of_n",
                  "sample N completions per prompt, keep the best by a reward source"),
    "rejection-sampling": ("alignkit.algorithms.rejection_sampling", "RejectionSamplingConfig", "run_rejection_sampling",
                           "iterated best-of-N fine-tuning (sample, keep the best, SFT)"),
    "demo": ("alignkit.tasks.demo", "DemoConfig", "run_demo", "the whole pipeline on the embedded SmolLM2"),
    "eval": ("alignkit.eval.evaluate", "EvalConfig", "run_eval",
             "evaluate a policy: gold/proxy reward, win rate, KL, entropy, perplexity, text metrics -> JSON"),
    "report": ("alignkit.eval.report", "ReportConfig", "run_report",
               "HTML report of run directories (curves, reward-KL frontier, over-optimisation, samples)"),
    "cai revise": ("alignkit.algorithms.constitutional", "ReviseConfig", "run_cai_revise",
                   "Constitutional AI: critique -> revision traces and an SFT dataset of the revisions"),
    "cai label": ("alignkit.algorithms.constitutional", "CAILabelConfig", "run_cai_label",
                  "RLAIF: soft preference labels from an AI judge, both orders averaged"),
}
# `alignkit cai revise ...` is the stage "cai revise": a group name followed by its subcommand.
GROUPS = {"cai": ("revise", "label"), "data": ("rankings-to-pairs",)}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="alignkit", description="Align language models with human preferences, stage by stage."
    )
    sub = parser.add_subparsers(dest="stage", metavar="STAGE")
    for name, (_, _, _, help_text) in STAGES.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--config", help="YAML config file (see --print-config for every key)")
        p.add_argument("--print-config", action="store_true", help="print the full config as YAML and exit")
        p.add_argument("overrides", nargs="*", metavar="key=value", help="override config keys, e.g. train.lr=1e-4")
        if name == "demo":
            p.add_argument("--fresh", action="store_true", help="delete the demo's outputs and start over")
    return parser


def _group_argv(argv: list[str]) -> list[str] | None:
    """["cai", "revise", ...] -> ["cai revise", ...]; None when a group is named without a subcommand."""
    if argv and argv[0] in GROUPS:
        if len(argv) < 2 or argv[1] not in GROUPS[argv[0]]:
            return None
        return [f"{argv[0]} {argv[1]}", *argv[2:]]
    return argv


def positional(module, overrides: list[str]) -> list[str]:
    """A stage module naming a list field in `POSITIONAL` (report: `runs`) takes bare arguments as its items:
    `alignkit report a b` is `alignkit report runs=[a,b]`."""
    name = getattr(module, "POSITIONAL", None)
    bare = [item for item in overrides if "=" not in item]
    if name is None or not bare:
        return overrides
    return [item for item in overrides if "=" in item] + [f"{name}={json.dumps(bare)}"]


def main(argv: list[str] | None = None) -> int:
    raw = list(sys.argv[1:] if argv is None else argv)
    if raw[:1] == ["label"] and raw[1:2] and raw[1] in label_cli.SUBCOMMANDS:  # the labelling app
        return label_cli.main(raw[1:])
    parser = build_parser()
    grouped = _group_argv(raw)
    if grouped is None:  # `alignkit cai` without a known subcommand
        asked = raw[1:2] in (["-h"], ["--help"])
        print(f"usage: alignkit {raw[0]} {{{','.join(GROUPS[raw[0]])}}} [--config FILE] [--print-config] "
              f"[key=value ...]", file=sys.stdout if asked else sys.stderr)
        return 0 if asked else 2
    args = parser.parse_args(grouped)
    if args.stage is None:
        parser.print_help()
        return 0
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("transformers", "accelerate", "httpx", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    module_name, config_name, run_name, _ = STAGES[args.stage]
    try:
        from alignkit.config import load_config, to_yaml

        module = importlib.import_module(module_name)
        config_cls = getattr(module, config_name)
        overrides = positional(module, list(args.overrides))
        overrides += ["fresh=true"] if getattr(args, "fresh", False) else []
        cfg = load_config(config_cls, args.config, overrides)
        if args.print_config:
            print(to_yaml(cfg), end="")
            return 0
        result = getattr(module, run_name)(cfg)
    except UserError as e:
        print(f"alignkit {args.stage}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a path that cannot be written or read: not a bug, one line
        where = " -> ".join(str(f) for f in (e.filename, e.filename2) if f is not None)
        print(f"alignkit {args.stage}: error: {where + ': ' if where else ''}{e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"alignkit {args.stage}: interrupted", file=sys.stderr)
        return 130
    finally:
        _end_process_group()
    if result is not None:
        print(result)
    return 0


def _end_process_group() -> None:
    """One of several processes (torchrun, `accelerate launch`): leave the process group before exiting."""
    import torch.distributed

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
