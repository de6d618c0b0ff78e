"""A planted signal: the query's embedding is its target's plus noise, under a large shared offset (like a
causal LM's embeddings). A matcher trained on it must find the target in its candidate sets, and tree and
hybrid search with it must find the target among the whole held-out corpus, at stated accuracies."""
import numpy as np
import pytest

from mixret.data import Pair, split_pairs
from mixret.models.matcher import MatcherConfig
from mixret.retrieval.evaluate import evaluate_pairs
from mixret.training.matcher import train_matcher

DIM, N = 32, 1000


class Planted:
    """Embeds "document i" as b_i + 2 m and "query i" as b_i + 0.4 n_i + m: b, n standard normal, |m| ~ 28."""

    def __init__(self, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.base = rng.standard_normal((N, DIM)).astype(np.float32)
        self.noise = rng.standard_normal((N, DIM)).astype(np.float32)
        self.mean = 5 * rng.standard_normal(DIM).astype(np.float32)

    def encode(self, texts, batch_size=64, **kwargs):
        out = []
        for t in texts:
            kind, i = t.split()
            i = int(i)
            out.append(self.base[i] + 2 * self.mean if kind == "document" else
                       self.base[i] + 0.4 * self.noise[i] + self.mean)
        return np.stack(out)


@pytest.fixture(scope="module")
def planted():
    model = Planted()
    train, test = split_pairs([Pair(f"p{i}", f"query {i}", f"document {i}") for i in range(N)], 0.2)
    enc = lambda pairs, side: model.encode([getattr(p, side) for p in pairs])  # noqa: E731
    matcher, metrics = train_matcher(enc(train, "query"), enc(train, "target"), enc(test, "query"),
                                     enc(test, "target"), MatcherConfig(emb_dim=DIM, d_model=64, n_layers=2,
                                                                        context=32),
                                     epochs=4, batch_size=64, lr=2e-3, seed=0, progress=False)
    return model, matcher, metrics, test


def test_matcher_finds_the_planted_target_in_its_sets(planted):
    _, _, m, test = planted
    assert m["n_test"] == len(test) > 150
    assert m["test"]["top1"] >= 0.95 and m["untrained_test"]["top1"] < 0.5


def test_tree_and_hybrid_find_the_planted_target_in_the_corpus(planted):
    model, matcher, _, test = planted
    report = evaluate_pairs(test, model, matcher, ["tree", "hybrid"], shortlist=64)
    assert report["corpus_size"] == len(test) and report["chance"]["R@1"] < 0.01
    for mode in ("tree", "hybrid"):
        assert report["modes"][mode]["R@1"] >= 0.9, (mode, report["modes"][mode])
        assert report["modes"][mode]["R@10"] >= 0.97, (mode, report["modes"][mode])
