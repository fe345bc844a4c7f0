"""Concept Consistency Graph: negative-transfer mitigation (PASER section 3.3).

Concepts are keyphrases extracted offline with YAKE from a sample's instruction, input and output,
normalised (lower case, punctuation stripped, simple plural-to-singular lemmatisation). The graph's
nodes are concepts of accepted samples; edges join concepts that co-occurred in one accepted sample.

Default rule (the paper's): a candidate *conflicts* when two of its concepts are both already in the
graph but were never seen together; accepted samples add their concepts and all their pairs.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from functools import lru_cache

# yake is imported when concepts are extracted: only the concept-consistency filter needs it.

_WORD = re.compile(r"[a-z0-9][a-z0-9+#.\-]*")


def lemmatize(word: str) -> str:
    """Cheap English singularisation: enough to merge 'functions'/'function', 'queries'/'query'."""
    if len(word) <= 3 or not word.isalpha():
        return word
    if word.endswith("ies") and len(word) > 4:
        return word[:-3] + "y"
    if word.endswith(("sses", "ches", "shes", "xes", "zes")):
        return word[:-2]
    if word.endswith("s") and not word.endswith(("ss", "us", "is")):
        return word[:-1]
    return word


def normalize_concept(phrase: str) -> str:
    words = [lemmatize(w.strip(".-")) for w in _WORD.findall(phrase.lower())]
    return " ".join(w for w in words if w)


@lru_cache(maxsize=1)
def _extractor(top: int):
    import yake

    return yake.KeywordExtractor(lan="en", n=2, top=top, dedupLim=0.7)


def extract_concepts(text: str, top: int = 5) -> frozenset[str]:
    """Up to ``top`` normalised keyphrases of ``text`` (YAKE, n-grams up to 2)."""
    text = text[:4000]  # keyphrases come from the start; bounds YAKE's cost on very long outputs
    found = (normalize_concept(k) for k, _ in _extractor(top).extract_keywords(text))
    return frozenset(c for c in found if c)


@dataclass
class ConceptGraph:
    """Concepts seen in accepted samples, and which pairs co-occurred."""

    nodes: set[str] = field(default_factory=set)
    edges: set[frozenset[str]] = field(default_factory=set)

    def conflict(self, concepts: frozenset[str]) -> tuple[str, str] | None:
        """The first pair of known concepts never seen together, or None when consistent."""
        known = sorted(c for c in concepts if c in self.nodes)
        for a, b in itertools.combinations(known, 2):
            if frozenset((a, b)) not in self.edges:
                return (a, b)
        return None

    def add(self, concepts: frozenset[str]) -> None:
        self.nodes.update(concepts)
        self.edges.update(frozenset(p) for p in itertools.combinations(sorted(concepts), 2))
