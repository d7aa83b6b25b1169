"""Checks a batch of new team rows before it joins `data/natural` (`pointsman check-batch`).

The natural split is a hash of the exact text, so a new row that paraphrases an existing
held-out row (or lands held out next to a paraphrase in training) would leak the test or
validation set into training without being a duplicate. Besides the format and exact-copy rules,
the check compares every new row with every existing one by TF-IDF cosine over word 1-2 grams
and reports pairs at or above a threshold where either side is held out.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pointsman_classifier.data import label_error, natural_split

KEYS = {"text", "domain", "risk", "kind", "author"}
KINDS = {
    "typical",
    "short",
    "typo",
    "long",
    "multilingual",
    "cross_domain",
    "hard_negative",
    "indirect",
    "subtle",
}
DEFAULT_THRESHOLD = 0.45  # the cut used for batches 4 and 5 (data/natural/README.md)


@dataclass(frozen=True)
class Row:
    file: str
    line: int
    text: str


@dataclass(frozen=True)
class Problem:
    """A new row the batch should not keep, and why."""

    row: Row
    reason: str  # "format", "duplicate" or "paraphrase"
    detail: str


def fold(text: str) -> str:
    """The text up to case, white space and punctuation (what counts as the same query)."""
    return " ".join(re.sub(r"[\W_]+", " ", text.lower()).split())


def read_rows(directory: Path) -> tuple[list[Row], list[Problem]]:
    """Every row of a folder's *.jsonl files, and the rows that break the format."""
    rows: list[Row] = []
    problems: list[Problem] = []
    for path in sorted(directory.glob("*.jsonl")):
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            where = Row(path.name, n, line)
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                problems.append(Problem(where, "format", f"not JSON: {exc.msg}"))
                continue
            error = format_error(obj)
            if error:
                problems.append(Problem(where, "format", error))
                continue
            rows.append(Row(path.name, n, obj["text"]))
    return rows, problems


def format_error(obj: object) -> str | None:
    if not isinstance(obj, dict) or set(obj) != KEYS:
        return f"keys must be exactly {sorted(KEYS)}"
    if not isinstance(obj["text"], str) or not obj["text"].strip():
        return "empty text"
    label = label_error(obj)
    if label:
        return label
    if obj["kind"] not in KINDS:
        return f"unknown kind {obj['kind']!r}"
    return None


def tfidf(texts: list[str]) -> list[dict[str, float]]:
    """L2-normalised TF-IDF vectors (sublinear tf, smooth idf) over word unigrams and bigrams,
    sparse: gram -> weight."""
    grams = []
    for t in texts:
        words = re.findall(r"\w+", t.lower())
        grams.append(Counter(words + [f"{a} {b}" for a, b in itertools.pairwise(words)]))
    df: Counter[str] = Counter(g for c in grams for g in c)
    idf = {g: math.log((1 + len(texts)) / (1 + n)) + 1 for g, n in df.items()}
    out = []
    for c in grams:
        v = {g: (1 + math.log(n)) * idf[g] for g, n in c.items()}
        norm = math.sqrt(sum(w * w for w in v.values())) or 1.0
        out.append({g: w / norm for g, w in v.items()})
    return out


def similarities(queries: list[dict[str, float]], corpus: list[dict[str, float]]) -> np.ndarray:
    """Cosine of every query vector with every corpus vector (an inverted index over grams)."""
    postings: dict[str, tuple[list[int], list[float]]] = {}
    for j, v in enumerate(corpus):
        for g, w in v.items():
            idx, ws = postings.setdefault(g, ([], []))
            idx.append(j)
            ws.append(w)
    index = {g: (np.array(i), np.array(w)) for g, (i, w) in postings.items()}
    out = np.zeros((len(queries), len(corpus)))
    for i, v in enumerate(queries):
        for g, w in v.items():
            if g in index:
                rows, weights = index[g]
                out[i, rows] += w * weights
    return out


def check_batch(
    batch: Path, natural: Path, threshold: float = DEFAULT_THRESHOLD
) -> tuple[list[Row], list[Problem]]:
    """The batch's rows and its problems: format, copies (of existing rows or within the batch)
    and paraphrases of existing rows across the split (either side validation or test)."""
    new, problems = read_rows(batch)
    old, _ = read_rows(natural)
    seen = {fold(r.text): f"{natural.name}/{r.file}:{r.line}" for r in old}
    kept: list[Row] = []
    for r in new:
        key = fold(r.text)
        if key in seen:
            problems.append(Problem(r, "duplicate", f"same text as {seen[key]}"))
        else:
            seen[key] = f"{batch.name}/{r.file}:{r.line}"
            kept.append(r)
    if kept and old:
        vectors = tfidf([r.text for r in kept] + [r.text for r in old])
        sims = similarities(vectors[: len(kept)], vectors[len(kept) :])
        old_split = [natural_split(r.text) for r in old]
        for i, r in enumerate(kept):
            new_split = natural_split(r.text)
            for j in np.flatnonzero(sims[i] >= threshold):
                if new_split != "train" or old_split[j] != "train":
                    o = old[j]
                    problems.append(
                        Problem(
                            r,
                            "paraphrase",
                            f"cosine {sims[i, j]:.2f} to {o.file}:{o.line} "
                            f"({old_split[j]}; this row: {new_split}): {o.text!r}",
                        )
                    )
                    break
    return new, problems


def drop(batch: Path, problems: list[Problem]) -> int:
    """Rewrite the batch files without the rows that have problems; returns how many went."""
    bad = {(p.row.file, p.row.line) for p in problems}
    for path in sorted(batch.glob("*.jsonl")):
        lines = path.read_text(encoding="utf-8").splitlines()
        keep = [ln for n, ln in enumerate(lines, 1) if (path.name, n) not in bad and ln.strip()]
        path.write_text("".join(ln + "\n" for ln in keep), encoding="utf-8")
    return len(bad)
