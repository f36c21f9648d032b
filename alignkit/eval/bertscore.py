"""BERTScore (Zhang et al. 2020, "BERTScore: Evaluating Text Generation with BERT") by greedy matching of
contextual token embeddings, computed with the embedded all-MiniLM-L6-v2 by default.

With reference tokens x (embeddings x_i) and candidate tokens x^ (x^_j), all L2-normalised:
    R = sum_i w(x_i) max_j x_i . x^_j / sum_i w(x_i)
    P = sum_j w(x^_j) max_i x_i . x^_j / sum_j w(x^_j)
    F = 2 P R / (P + R)
with w = 1 (default) or w = idf(w) = log((M + 1) / (df(w) + 1)) over the M references (the paper's
plus-one smoothing, as in the authors' `bert_score` package; M >= 2, as one reference would give each of its
tokens idf 0). Special tokens ([CLS], [SEP]) weigh 0 but stay in the matching (a token's best match may be
the other text's [SEP]), and F = 0 where P + R = 0, both as in `bert_score`. With several references per
candidate each of P, R and F is its best over the references (`bert_score`'s max per column).

Differences from the published default: the paper and `bert_score` use roberta-large (layer 17) for
English; we use all-MiniLM-L6-v2's last layer (or `layer`), which runs offline and fast on a CPU, and
no baseline rescaling. Scores are comparable between runs of alignkit, not with published numbers.
"""

from __future__ import annotations

import inspect
import math
from collections import Counter
from typing import Sequence

import torch

from alignkit.errors import UserError
from alignkit.eval.text import as_reference_lists


class BERTScorer:
    """`scorer.score(candidates, references) -> {"precision", "recall", "f1"}` tensors (N,).

    `model` is a model directory ('minilm' = the embedded MiniLM) or a loaded encoder with `tokenizer`.
    """

    def __init__(self, model="minilm", tokenizer=None, layer: int | None = None, idf: bool = False,
                 batch_size: int = 32, max_length: int = 512):
        if isinstance(model, str):
            from transformers import AutoModel, AutoTokenizer

            from alignkit.models.load import from_pretrained

            tokenizer = from_pretrained(AutoTokenizer, model, "a BERTScore tokenizer")
            model = from_pretrained(AutoModel, model, "a BERTScore encoder")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.layer, self.idf, self.batch_size, self.max_length = layer, idf, batch_size, max_length
        self.inputs = set(inspect.signature(self.model.forward).parameters)  # e.g. no token_type_ids for Llama

    @torch.no_grad()
    def embed(self, texts: Sequence[str]) -> list[tuple[torch.Tensor, list[int], torch.Tensor]]:
        """Per text: normalised embeddings (L, H) of its tokens, their ids, and which are special tokens (L,)."""
        device = next(self.model.parameters()).device
        out = []
        for i in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(list(texts[i : i + self.batch_size]), padding=True, padding_side="right",
                                 truncation=True, max_length=self.max_length, return_tensors="pt",
                                 return_special_tokens_mask=True)  # right: the positions of an unpadded text
            special = enc.pop("special_tokens_mask").bool()  # (b, T)
            inputs = {k: v.to(device) for k, v in enc.items() if k in self.inputs}
            result = self.model(**inputs, output_hidden_states=self.layer is not None)
            states = result.last_hidden_state if self.layer is None else result.hidden_states[self.layer]
            states = torch.nn.functional.normalize(states.float(), dim=-1).cpu()  # (b, T, H)
            for row, mask, ids, spec in zip(states, enc["attention_mask"].bool(), enc["input_ids"], special):
                out.append((row[mask], ids[mask].tolist(), spec[mask]))
        return out

    def _weights(self, ids: list[int], special: torch.Tensor, idf: dict | None) -> torch.Tensor:
        w = torch.ones(len(ids)) if idf is None else torch.tensor([idf.get(i, idf[None]) for i in ids])
        return w.masked_fill(special, 0.0)

    def score(self, candidates: Sequence[str], references: Sequence) -> dict[str, torch.Tensor]:
        """P, R, F1 (N,) of each candidate against its reference (a string or a list of strings)."""
        refs = as_reference_lists(candidates, references)
        flat = [r for row in refs for r in row]
        if self.idf and len(flat) < 2:
            raise UserError(f"BERTScore idf weights need at least 2 references, got {len(flat)}: with one, each of "
                            "its tokens has idf log(2 / 2) = 0 and the score is 0; score without idf")
        ref_emb = self.embed(flat)
        cand_emb = self.embed(list(candidates))
        idf = idf_table([[i for i, s in zip(ids, spec) if not s] for _, ids, spec in ref_emb]) if self.idf else None
        out = {"precision": [], "recall": [], "f1": []}
        start = 0
        for (c, c_ids, c_spec), row in zip(cand_emb, refs):
            scores = [greedy_match(c, self._weights(c_ids, c_spec, idf), r, self._weights(r_ids, r_spec, idf))
                      for r, r_ids, r_spec in ref_emb[start : start + len(row)]]
            start += len(row)
            for key, values in zip(out, zip(*scores)):
                out[key].append(max(values))
        return {k: torch.tensor(v, dtype=torch.float64) for k, v in out.items()}


def idf_table(docs: Sequence[Sequence[int]]) -> dict:
    """idf(w) = log((M + 1) / (df(w) + 1)) over M documents of token ids; key None = unseen token (df 0)."""
    m = len(docs)
    df = Counter(w for doc in docs for w in set(doc))
    table = {w: math.log((m + 1) / (n + 1)) for w, n in df.items()}
    table[None] = math.log(m + 1)
    return table


def greedy_match(cand: torch.Tensor, cand_w: torch.Tensor, ref: torch.Tensor, ref_w: torch.Tensor
                 ) -> tuple[float, float, float]:
    """(P, R, F1) of candidate embeddings (Lc, H) against reference embeddings (Lr, H), both normalised, with
    token weights (Lc,), (Lr,); a text without a weighted token (empty, or only special tokens) scores 0."""
    if not (cand_w > 0).any() or not (ref_w > 0).any():
        return 0.0, 0.0, 0.0
    sim = cand @ ref.T  # (Lc, Lr) cosine similarities
    precision = float((sim.max(1).values * cand_w).sum() / cand_w.sum().clamp_min(1e-12))
    recall = float((sim.max(0).values * ref_w).sum() / ref_w.sum().clamp_min(1e-12))
    f1 = 2 * precision * recall / (precision + recall) if precision + recall != 0 else 0.0
    return precision, recall, f1
