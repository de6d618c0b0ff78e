"""Planted-signal corpora: pairs whose query and document share two rare words amid common filler, and
documents alone, each about two rare words it repeats."""
import itertools

import numpy as np

from mixret.data import Pair

FILLER = ["the", "a", "tool", "for", "and", "with", "data", "library", "files", "small"]


def planted_pairs(n=276, n_words=24, seed=0) -> list[Pair]:
    """Each pair shares two rare words (a distinct combination of n_words) between query and document, amid
    common filler words: a model can only match them by those words, and held-out pairs use unseen
    combinations of words seen in training."""
    rng = np.random.default_rng(seed)
    words = ["".join(w) for w in rng.choice(list("bcdfghjklmnpqrstvwxz"), (n_words, 4))]
    combos = list(itertools.combinations(range(n_words), 2))
    rng.shuffle(combos)
    pairs = []
    for i, (a, b) in enumerate(combos[:n]):
        query = f"{words[a]} {rng.choice(FILLER)} {words[b]}"
        doc = " ".join([*rng.choice(FILLER, 3), words[b], *rng.choice(FILLER, 2), words[a], *rng.choice(FILLER, 2)])
        pairs.append(Pair(f"p{i}", query, doc))
    return pairs


def planted_documents(n=276, n_words=24, seed=0) -> list[str]:
    """Documents and no pairs: each is about a distinct combination of two of n_words rare words, which it
    repeats (three times each) amid common filler words, in a shuffled order. A span of a few words names the
    document's words; held-out documents use unseen combinations of words seen in training."""
    rng = np.random.default_rng(seed)
    words = ["".join(w) for w in rng.choice(list("bcdfghjklmnpqrstvwxz"), (n_words, 4))]
    combos = list(itertools.combinations(range(n_words), 2))
    rng.shuffle(combos)
    docs = []
    for a, b in combos[:n]:
        body = [words[a]] * 3 + [words[b]] * 3 + list(rng.choice(FILLER, 8))
        rng.shuffle(body)
        docs.append(" ".join(body))
    return docs
