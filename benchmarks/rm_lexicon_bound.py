"""How well could a reward model trained on the demo preferences match VADER? A bound from the lexicon.

    python benchmarks/rm_lexicon_bound.py      # a few seconds; builds the demo preference files if needed

VADER scores a text by summing the valences of the lexicon words in it (with rules for negation,
intensifiers, "but", capitals and "!") and squashing the sum. A model can learn a word's valence from
the training comparisons only if the word occurs in the training texts, and learn it well only if it
occurs in several. Each table scores the 500 held-out pairs of `alignkit rm --config
examples/rm_minilm_vader.yaml` with VADER itself (all its rules) but with its lexicon cut down to the
words found in at least k distinct training texts (of the 2,000 review pairs `data.train=demo`, then of
the K = 8 rankings `data.train=demo-large`): an oracle that knows VADER's rules and, exactly, every
valence it could have seen k times. It reports how often that oracle orders the held-out pairs
as full VADER does (agreement) and its accuracy on the held-out labels (the number `alignkit rm`
reports; the issue's target is the ceiling minus 5 points).
"""

from __future__ import annotations

import json

from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer, SentiText

from alignkit.data.jsonl import read_jsonl
from alignkit.feedback.simulated import ceiling_path
from alignkit.tasks.preference_demo import build_preference_demo


def bound(name: str, texts: set[str], held_out: list[dict], ceiling: float) -> None:
    analyzer = SentimentIntensityAnalyzer()
    lexicon = dict(analyzer.lexicon)
    in_texts: dict[str, int] = {}  # lexicon word -> number of distinct training texts it occurs in
    for text in texts:
        for word in {w.lower() for w in SentiText(text).words_and_emoticons} & lexicon.keys():
            in_texts[word] = in_texts.get(word, 0) + 1

    def measure(min_texts: int | None) -> tuple[int, float, float]:
        analyzer.lexicon = lexicon if min_texts is None else {
            w: v for w, v in lexicon.items() if in_texts.get(w, 0) >= min_texts}
        agree = n = correct = 0.0
        for row in held_out:
            a, b = (analyzer.polarity_scores(row[k])["compound"] for k in ("chosen", "rejected"))
            correct += (a > b) + 0.5 * (a == b)
            gold = row["chosen_gold"] - row["rejected_gold"]
            if gold:
                n += 1
                agree += ((a - b) * gold > 0) + 0.5 * (a == b)
        return len(analyzer.lexicon), agree / n, correct / len(held_out)

    print(f"\n{name}: {len(texts)} distinct training texts, {len(held_out)} held-out pairs, "
          f"ceiling {ceiling:.3f}, target {ceiling - 0.05:.3f}\n")
    print("| VADER's lexicon cut to words in >= k training texts | words kept | agreement with VADER "
          "| held-out accuracy |\n|---|---|---|---|")
    for k in (None, 1, 2, 3, 5, 10, 20):
        words, agreement, accuracy = measure(k)
        print(f"| {'full lexicon' if k is None else k} | {words} | {agreement:.3f} | {accuracy:.3f} |")


def main() -> None:
    paths = build_preference_demo()
    held_out = read_jsonl(paths["pairs_eval"])
    ceiling = json.loads(ceiling_path(paths["pairs_eval"]).read_text())["ceiling"]
    pairs = read_jsonl(paths["pairs_train"])
    bound("pairs_train (data.train=demo)", {t for row in pairs for t in (row["chosen"], row["rejected"])},
          held_out, ceiling)
    large = read_jsonl(paths["rankings_large"])
    bound("rankings_large (data.train=demo-large)", {t for row in large for t in row["completions"]},
          held_out, ceiling)


if __name__ == "__main__":
    main()
