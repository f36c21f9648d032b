"""Text metrics of completions: diversity and length, and overlap with references (BLEU, chrF, ROUGE).

Diversity works on words: lower-cased `\\w+` runs and single punctuation marks (`words`).
    distinct-n      = |unique n-grams| / |n-grams|, over all completions together (Li et al. 2016)
    unique-n        = |unique n-grams|
    entropy-n       = -sum_g f_g log2 f_g, f_g the frequency of n-gram g among all n-grams (bits)
    MSSTR           = mean type-token ratio of consecutive segments of `segment` words of the
                      concatenated completions; the last, shorter segment is dropped (Johnson 1944;
                      as in the GEM benchmark's msttr-100)
BLEU and chrF are sacrebleu's corpus scores (0-100; Post 2018), ROUGE-1/2/L is Google's `rouge-score`
F-measure with stemming (Lin 2004), both against one or more references per completion.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Sequence

_WORD = re.compile(r"\w+|[^\w\s]")


def words(text: str) -> list[str]:
    """Lower-cased words and punctuation marks of `text`."""
    return _WORD.findall(text.lower())


def ngrams(tokens: Sequence[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def ngram_counts(texts: Sequence[str], n: int) -> Counter:
    """Counts of word n-grams over all texts (n-grams never cross from one text to the next)."""
    counts: Counter = Counter()
    for text in texts:
        counts.update(ngrams(words(text), n))
    return counts


def distinct_n(texts: Sequence[str], n: int) -> float:
    """|unique n-grams| / |n-grams| over all texts; 0 when there are no n-grams."""
    counts = ngram_counts(texts, n)
    total = sum(counts.values())
    return len(counts) / total if total else 0.0


def ngram_entropy(texts: Sequence[str], n: int) -> float:
    """Shannon entropy (bits) of the n-gram frequency distribution over all texts."""
    counts = ngram_counts(texts, n)
    total = sum(counts.values())
    return -sum(c / total * math.log2(c / total) for c in counts.values()) if total else 0.0


def msstr(texts: Sequence[str], segment: int = 100) -> float | None:
    """Mean segmental type-token ratio over full segments of `segment` words; None if there is none."""
    stream = [w for text in texts for w in words(text)]
    segments = [stream[i : i + segment] for i in range(0, len(stream) - segment + 1, segment)]
    if not segments:
        return None
    return sum(len(set(s)) / segment for s in segments) / len(segments)


def diversity(texts: Sequence[str], segment: int = 100) -> dict:
    """distinct-1/2, unique-1/2, entropy-1/2 (bits), msstr, and mean/std length in words."""
    lengths = [len(words(t)) for t in texts]
    mean = sum(lengths) / max(len(lengths), 1)
    std = math.sqrt(sum((n - mean) ** 2 for n in lengths) / max(len(lengths), 1))
    out = {f"text/{name}-{n}": fn(texts, n) for n in (1, 2)
           for name, fn in (("distinct", distinct_n), ("entropy", ngram_entropy))}
    out.update({f"text/unique-{n}": len(ngram_counts(texts, n)) for n in (1, 2)})
    out.update({"text/msstr": msstr(texts, segment), "text/length": mean, "text/length_std": std})
    return out


def as_reference_lists(completions: Sequence[str], references: Sequence) -> list[list[str]]:
    """Each completion's references as a non-empty list of strings (a single string becomes a list of one)."""
    if not completions:
        raise ValueError("no completions to score")
    if len(completions) != len(references):
        raise ValueError(f"{len(completions)} completions but {len(references)} references: give one entry (a string "
                         "or a list of strings) per completion")
    out = [[r] if isinstance(r, str) else list(r) for r in references]
    if any(not refs for refs in out):
        raise ValueError("every completion needs at least one reference")
    return out


def bleu_chrf(completions: Sequence[str], references: Sequence) -> dict:
    """sacrebleu corpus BLEU and chrF (0-100). Rows with fewer references than the most are padded with
    copies of their first one, which changes neither score (clipped counts and the closest length take a
    max/min over references)."""
    import sacrebleu

    refs = as_reference_lists(completions, references)
    k = max(len(r) for r in refs)
    streams = [[r[j] if j < len(r) else r[0] for r in refs] for j in range(k)]  # k streams of len(completions)
    return {"text/bleu": sacrebleu.corpus_bleu(list(completions), streams).score,
            "text/chrf": sacrebleu.corpus_chrf(list(completions), streams).score}


def rouge(completions: Sequence[str], references: Sequence) -> dict:
    """Mean ROUGE-1/2/L F-measures (0-1); with several references the best one per completion counts."""
    from rouge_score import rouge_scorer

    kinds = ("rouge1", "rouge2", "rougeL")
    scorer = rouge_scorer.RougeScorer(list(kinds), use_stemmer=True)
    totals = dict.fromkeys(kinds, 0.0)
    refs = as_reference_lists(completions, references)
    for completion, row_refs in zip(completions, refs):
        scores = scorer.score_multi(row_refs, completion)
        for kind in kinds:
            totals[kind] += scores[kind].fmeasure
    return {f"text/{kind}": total / max(len(refs), 1) for kind, total in totals.items()}
