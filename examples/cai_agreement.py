"""How well does an AI judge agree with the VADER gold judge, and how much does it pick by position?

    python examples/cai_agreement.py --pairs 64 --revise-prompts 50 --out runs/cai_agreement

1. (optional) `alignkit cai revise` on the shipped red-team prompts: traces.jsonl + sft.jsonl.
2. `alignkit cai label` on the held-out demo review pairs with the sentiment principle ("Which of these
   responses is more positive and enthusiastic?"), judged by the embedded SmolLM2-135M-Instruct.
3. Agreement with VADER (which response has the higher compound sentiment), before order swapping
   (one order only) and after (both orders averaged), and the position-bias rate (share of pairs
   where the judge prefers the same letter in both orders), overall and by the size of the VADER gap.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch

from alignkit.algorithms.constitutional import (
    CAILabelConfig,
    ReviseConfig,
    agreement_report,
    report_path,
    run_cai_label,
    run_cai_revise,
)
from alignkit.data.preferences import read_pairs, prompt_of
from alignkit.feedback.ai_judge import JudgeConfig
from alignkit.models.load import ModelConfig
from alignkit.rewards.gold import load_judge
from alignkit.rollout.generate import SamplingConfig

KEYS = ("pairs", "same_letter_rate", "letter_a_rate", "agreement_order_ab", "agreement_order_ba",
        "agreement_swapped", "agreement_consistent")


def gaps_by_order(rows: list[dict]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(P(A) with a first, P(A) with b first, VADER g(a) - g(b)) of labelled pairs (a = the input's first)."""
    vader = load_judge("vader")
    prompts = [prompt_of(r) for r in rows]
    chosen_minus_rejected = (vader.score(prompts, [r["chosen"] for r in rows])
                             - vader.score(prompts, [r["rejected"] for r in rows]))
    sign = torch.tensor([1.0 if r["ai_chosen_is_a"] else -1.0 for r in rows], dtype=torch.float64)
    p_ab = torch.tensor([r["ai_p_ab"] for r in rows])
    p_ba = torch.tensor([r["ai_p_ba"] for r in rows])
    return p_ab, p_ba, sign * chosen_minus_rejected


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--pairs", type=int, default=64, help="demo pairs to label")
    parser.add_argument("--revise-prompts", type=int, default=0, help="red-team prompts to revise (0 = skip)")
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--cot", action="store_true", help="chain-of-thought judge (clamped to [0.4, 0.6])")
    parser.add_argument("--out", default="runs/cai_agreement")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = Path(args.out)
    model = ModelConfig(path=args.model)
    if args.revise_prompts:
        run_cai_revise(ReviseConfig(model=model, max_prompts=args.revise_prompts, output_dir=str(out / "revise"),
                                    sampling=SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=0.7,
                                                            seed=0)))
    labelled = out / ("pairs_cot.jsonl" if args.cot else "pairs.jsonl")
    judge = JudgeConfig(model=model, chain_of_thought=args.cot,
                        rationale=SamplingConfig(max_new_tokens=args.max_new_tokens, do_sample=False))
    run_cai_label(CAILabelConfig(judge=judge, input="demo", output=str(labelled), principles=["positive"],
                                 max_pairs=args.pairs, gold="vader"))
    p_ab, p_ba, gap = gaps_by_order(read_pairs(labelled))
    table = {"all": agreement_report(p_ab, p_ba, gap)}
    for name, mask in (("|vader gap| >= 0.5", gap.abs() >= 0.5), ("|vader gap| < 0.5", gap.abs() < 0.5)):
        if mask.any():
            table[name] = agreement_report(p_ab[mask], p_ba[mask], gap[mask])
    print(f"\nAI judge {args.model} ({'chain of thought' if args.cot else 'direct answer'}) vs VADER, "
          f"principle 'positive'; report: {report_path(labelled)}")
    print(f"{'subset':<20}" + "".join(f"{k:>22}" for k in KEYS))
    for name, r in table.items():
        print(f"{name:<20}" + "".join(f"{r[k]:>22.3f}" if k != "pairs" else f"{r[k]:>22d}" for k in KEYS))
    (out / "agreement.json").write_text(json.dumps(table, indent=2) + "\n")


if __name__ == "__main__":
    main()
