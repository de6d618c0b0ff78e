"""The matcher: learning, deterministic evaluation, candidate sampling, bad input, save/load."""
import json
import math

import numpy as np
import pytest
import torch
from close import assert_close

from mixret.errors import MixretError
from mixret.models.matcher import Matcher, MatcherConfig, score_candidates
from mixret.training.matcher import (
    PADDED_SHARE,
    SetLoss,
    as_pair_set,
    build_eval_sets,
    dedupe_queries,
    evaluate,
    hard_negative_pool,
    pad_sets,
    sample_candidates,
    set_metrics,
    train_matcher,
)

E = 32
CONTEXT = 32


def synthetic_pairs(n: int, dim: int = E, noise: float = 0.5, seed: int = 0):
    """Targets are noisy copies of the queries, both shifted by a large shared mean, like LM embeddings."""
    r = np.random.default_rng(seed)
    mean = 5.0 * r.normal(size=dim)
    q = r.normal(size=(n, dim))
    t = q + noise * r.normal(size=(n, dim))
    return (q + mean).astype(np.float32), (t + 2 * mean).astype(np.float32)


def small_config(**kw) -> MatcherConfig:
    return MatcherConfig(**{"emb_dim": E, "d_model": 64, "n_layers": 2, "context": CONTEXT, **kw})


@pytest.fixture(scope="module")
def training_sets() -> list:
    """(mask [B, N], true positions [B]) of every training batch of `trained`, as its loss saw them."""
    return []


@pytest.fixture(scope="module")
def trained(tmp_path_factory, training_sets):
    """A matcher trained for a few seconds on 1000 synthetic pairs (+ 200 test pairs), saved to disk."""
    q, t = synthetic_pairs(1200)
    out = tmp_path_factory.mktemp("matcher")
    loss = SetLoss.forward

    def recording(self, batch):
        training_sets.append((batch[2].detach().clone(), batch[3].detach().clone()))
        return loss(self, batch)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(SetLoss, "forward", recording)
        matcher, metrics = train_matcher(q[200:], t[200:], q[:200], t[:200], small_config(), epochs=3,
                                         batch_size=64, lr=2e-3, seed=0, out_dir=out, progress=False)
    return matcher, metrics, out, (q, t)


# -- learning ---------------------------------------------------------------------------------

def test_learns_synthetic_task(trained):
    matcher, m, _, _ = trained
    assert m["chance_ce"] == pytest.approx(math.log(CONTEXT - 1))
    assert m["chance_top1"] == pytest.approx(1 / (CONTEXT - 1))
    assert m["untrained_test"]["top1"] < 0.2
    assert m["test"]["top1"] >= 0.95 and m["train"]["top1"] >= 0.95
    assert m["test"]["ce"] < 0.3 < m["chance_ce"]
    assert m["steps_to_leave_chance"] is not None and m["steps_to_leave_chance"] < m["steps"]
    for key in ("test_cosine", "test_centered_cosine"):  # targets are noisy copies: cosine finds them too
        assert m[key]["top1"] >= 0.95 and m[key]["mrr"] >= m[key]["top1"]
    assert not matcher.training


def test_metrics_files_written(trained):
    _, m, out, _ = trained
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in lines] == [1, 2, 3]
    assert lines[-1]["test"] == m["test"]
    assert json.loads((out / "metrics.json").read_text())["test"] == m["test"]


def test_ties_count_against_the_target():
    """Constant scores rank the target last (top-1 0, MRR 1/N), never first; padding (-inf) never ties."""
    m = set_metrics(torch.zeros(6, 7), torch.arange(6), with_ce=True)
    assert m["top1"] == 0.0 and m["mrr"] == pytest.approx(1 / 7) and m["ce"] == pytest.approx(math.log(7))
    assert set_metrics(torch.tensor([[1.0, 1.0, 0.0]]), torch.tensor([0]), False) == {"top1": 0.0, "mrr": 0.5}
    inf = float("-inf")
    assert set_metrics(torch.tensor([[2.0, inf, inf]]), torch.tensor([0]), False) == {"top1": 1.0, "mrr": 1.0}


def test_training_sets_are_partly_padded_like_a_tournament_pass():
    g = torch.Generator().manual_seed(0)
    true = torch.randint(0, 500, (4000,), generator=g)
    sets, pos = sample_candidates(true, 500, CONTEXT - 1, g)
    padded, new_pos, mask = pad_sets(sets, pos, g)
    real = mask.sum(1)
    assert torch.equal(padded[torch.arange(4000), new_pos], true)    # the target stays, among the real slots
    assert (new_pos < real).all() and (mask == (torch.arange(CONTEXT - 1) < real[:, None])).all()
    assert 0.4 < (real < CONTEXT - 1).float().mean() < 0.6 and real.min() == 2
    assert torch.equal(padded.sort(1).values, sets.sort(1).values)   # the same candidates, some slots swapped
    three = pad_sets(sets, pos, g, n_real=3)[2]
    assert (three.sum(1) == 3).all()


def test_keeps_its_accuracy_on_sets_with_three_real_candidates(trained, training_sets):
    """Trained with padded sets (PADDED_SHARE of them keep 2 to N-1 real candidates, the target among them),
    the matcher ranks as well when only three candidates of a set are real."""
    matcher, m, out, (q, t) = trained
    mask = torch.cat([mk for mk, _ in training_sets])
    positions = torch.cat([pos for _, pos in training_sets])
    real = mask.sum(1)
    assert len(real) == 3 * 1000 and mask.shape[1] == CONTEXT - 1                  # 3 epochs of 1000 pairs
    assert torch.equal(mask, torch.arange(CONTEXT - 1)[None] < real[:, None])    # the real slots come first
    assert (positions < real).all()                                             # the target is a real slot
    padded = real < CONTEXT - 1
    assert abs(padded.float().mean().item() - PADDED_SHARE) < 0.1
    assert real[padded].min() == 2 and real[padded].max() == CONTEXT - 2
    test = as_pair_set(q[:200], t[:200], "test", CONTEXT)
    sets, pos = build_eval_sets(len(test.targets), CONTEXT, 0, test.true_index)
    sets, pos, mask = pad_sets(sets, pos, torch.Generator().manual_seed(1), n_real=3)
    three = evaluate(matcher, test, sets, pos, mask=mask)
    assert three["top1"] >= m["test"]["top1"] - 0.02 and three["top1"] >= 0.95
    saved = json.loads((out / "metrics.json").read_text())  # full and partly padded sets side by side
    assert saved["test_padded"]["top1"] >= 0.95 and saved["test"] == m["test"]
    assert "not retrieval over a corpus" in saved["note"] and 1 / 31 < saved["chance_top1_padded"] < 0.5


def test_evaluation_is_deterministic(trained):
    matcher, m, _, (q, t) = trained
    test = as_pair_set(q[:200], t[:200], "test", CONTEXT)
    sets, pos = build_eval_sets(len(test.targets), CONTEXT, 0, test.true_index)
    first, second = evaluate(matcher, test, sets, pos), evaluate(matcher, test, sets, pos)
    assert first == second == m["test"]
    again = build_eval_sets(len(test.targets), CONTEXT, 0, test.true_index)
    assert torch.equal(sets, again[0]) and torch.equal(pos, again[1])
    other = build_eval_sets(len(test.targets), CONTEXT, 1, test.true_index)
    assert not torch.equal(sets, other[0])


def test_slot_permutation(trained):
    matcher, _, _, (q, t) = trained
    qs, ts = torch.from_numpy(q[:200]), torch.from_numpy(t[:200])
    sets, _ = build_eval_sets(200, CONTEXT, 3)
    logits = torch.from_numpy(score_candidates(matcher, qs, ts[sets]))       # [200, 31]
    perm = torch.randperm(CONTEXT - 1)
    permuted = torch.from_numpy(score_candidates(matcher, qs, ts[sets[:, perm]]))
    assert torch.equal(sets[:, perm][torch.arange(200), permuted.argmax(1)],
                       sets[torch.arange(200), logits.argmax(1)])
    # logits follow their candidate, up to the small position dependence of the learned mixing
    assert torch.corrcoef(torch.stack([logits[:, perm].flatten(), permuted.flatten()]))[0, 1] > 0.95


def test_mask_acts_as_padding(trained):
    matcher, _, _, (q, t) = trained
    qs, cands = torch.from_numpy(q[:8]), torch.from_numpy(t[:20]).expand(8, 20, E)
    mask = torch.ones(8, 20, dtype=torch.bool)
    mask[:, 12:] = False
    with torch.no_grad():
        masked = matcher(qs, cands, mask)
        short = matcher(qs, cands[:, :12].contiguous())
        noisy = matcher(qs, torch.cat([cands[:, :12], torch.full((8, 8, E), float("nan"))], 1), mask)
    assert torch.isinf(masked[:, 12:]).all() and (masked[:, 12:] < 0).all()
    assert_close(masked[:, :12], short)
    assert_close(noisy[:, :12], short)  # masked-out content has no influence


def test_score_candidates_matches_forward(trained):
    matcher, _, _, (q, t) = trained
    qs, cands = torch.from_numpy(q[:10]), torch.from_numpy(t[:310]).view(10, 31, E)
    scores = score_candidates(matcher, qs, cands, batch_size=3)
    assert isinstance(scores, np.ndarray) and scores.shape == (10, 31)
    with torch.no_grad():
        assert_close(scores, matcher(qs, cands).numpy())


# -- candidate sets ---------------------------------------------------------------------------

def check_sets(sets, pos, true_index):
    B, S = sets.shape
    assert torch.equal(sets[torch.arange(B), pos], true_index)
    assert ((sets == true_index[:, None]).sum(1) == 1).all()  # the true target exactly once
    assert (sets.sort(1).values.diff(dim=1) != 0).all()       # no duplicates
    assert (sets >= 0).all()


@pytest.mark.parametrize("n_targets", [31, 40, 500])
def test_sampled_sets_are_valid(n_targets):
    g = torch.Generator().manual_seed(0)
    positions = []
    for _ in range(50):
        true = torch.randint(0, n_targets, (64,), generator=g)
        sets, pos = sample_candidates(true, n_targets, CONTEXT - 1, g)
        check_sets(sets, pos, true)
        assert (sets < n_targets).all()
        positions.append(pos)
    counts = torch.bincount(torch.cat(positions), minlength=CONTEXT - 1)
    assert counts.min() > 0.5 * counts.float().mean()  # the true target is spread over all slots


def test_sampled_sets_with_hard_negatives():
    q, t = synthetic_pairs(300, seed=1)
    pairs = as_pair_set(q, t, "train", CONTEXT)
    K = 5
    pool = hard_negative_pool(pairs.queries, pairs.targets, pairs.true_index, 4 * K,
                              pairs.queries.mean(0), pairs.targets.mean(0))
    assert pool.shape == (300, 4 * K)
    assert not (pool == pairs.true_index[:, None]).any()
    assert (pool.sort(1).values.diff(dim=1) != 0).all()
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        rows = torch.randint(0, 300, (64,), generator=g)
        true = pairs.true_index[rows]
        sets, pos = sample_candidates(true, len(pairs.targets), CONTEXT - 1, g, pool[rows], K)
        check_sets(sets, pos, true)
        from_pool = (sets[:, :, None] == pool[rows][:, None, :]).any(-1).sum(1)
        assert (from_pool >= K).all()


def test_identical_targets_are_one_target():
    q, t = synthetic_pairs(40)
    t[5] = t[7] = t[9]
    pairs = as_pair_set(q, t, "train", CONTEXT)
    assert len(pairs.targets) == 38
    assert pairs.true_index[5] == pairs.true_index[7] == pairs.true_index[9]
    sets, pos = build_eval_sets(len(pairs.targets), CONTEXT, 0, pairs.true_index)
    check_sets(sets, pos, pairs.true_index)


def test_hard_negatives_are_closer_to_the_query_than_random_ones():
    """The pool holds each query's nearest other targets (centred cosine): their mean similarity to the query is
    far above that of random targets (about 0), and sets drawn with hard negatives hold more similar negatives."""
    q, t = synthetic_pairs(300, seed=1)
    pairs = as_pair_set(q, t, "train", CONTEXT)
    qm, tm = pairs.queries.mean(0), pairs.targets.mean(0)
    pool = hard_negative_pool(pairs.queries, pairs.targets, pairs.true_index, 20, qm, tm)
    sim = torch.nn.functional.normalize(pairs.queries - qm, dim=-1) @ \
        torch.nn.functional.normalize(pairs.targets - tm, dim=-1).T                      # [Q, T]
    random_mean = sim.mean().item()
    assert abs(random_mean) < 0.02 and sim.gather(1, pool).mean().item() > random_mean + 0.2

    def negative_similarity(k):
        g = torch.Generator().manual_seed(0)
        sets, pos = sample_candidates(pairs.true_index, len(pairs.targets), CONTEXT - 1, g, pool, k)
        s = sim.gather(1, sets)
        s[torch.arange(len(sets)), pos] = float("nan")  # the true target is not a negative
        return s.nanmean().item()
    assert negative_similarity(8) > negative_similarity(0) + 0.05


def test_hard_negative_training_learns():
    q, t = synthetic_pairs(300)
    _, m = train_matcher(q[60:], t[60:], q[:60], t[:60], small_config(), epochs=1, batch_size=64,
                         hard_negatives=4, progress=False)
    assert m["hard_negatives"] == 4 and m["test"]["top1"] > 10 * m["chance_top1"]


# -- bad input --------------------------------------------------------------------------------

def train_quick(q, t, tq, tt, **kw):
    return train_matcher(q, t, tq, tt, kw.pop("config", small_config()), epochs=1, progress=False, **kw)


def test_too_few_pairs():
    q, t = synthetic_pairs(100)
    with pytest.raises(MixretError, match=r"train split: 20 distinct targets.*context 32"):
        train_quick(q[:20], t[:20], q[50:], t[50:])
    with pytest.raises(MixretError, match=r"test split: 30 distinct targets"):
        train_quick(q[:50], t[:50], q[50:80], t[50:80])


def test_duplicate_queries():
    q, t = synthetic_pairs(100)
    q[3] = q[10] = q[0]
    with pytest.raises(MixretError, match=r"train split: 2 duplicate query embedding"):
        train_quick(q[:60], t[:60], q[60:], t[60:])
    dq, dt, keep = dedupe_queries(q, t)
    assert len(dq) == 98 and 3 not in keep and 10 not in keep and keep[0] == 0
    np.testing.assert_array_equal(dt, t[keep])


def test_mismatched_dims():
    q, t = synthetic_pairs(100)
    t16 = synthetic_pairs(100, dim=16)[1]
    with pytest.raises(MixretError, match=r"query embeddings have dim 32 but target embeddings have dim 16"):
        train_quick(q[:60], t16[:60], q[60:], t[60:])
    with pytest.raises(MixretError, match=r"emb_dim 16 but the embeddings have dim 32"):
        train_quick(q[:60], t[:60], q[60:], t[60:], config=small_config(emb_dim=16))
    with pytest.raises(MixretError, match="pairs must be aligned"):
        train_quick(q[:60], t[:59], q[60:], t[60:])


def test_nan_embeddings():
    q, t = synthetic_pairs(100)
    t[70, 4] = np.nan
    with pytest.raises(MixretError, match=r"test split: 1 target embedding\(s\) contain NaN"):
        train_quick(q[:60], t[:60], q[60:], t[60:])


def test_forward_rejects_wrong_dim_and_too_many_candidates():
    m = Matcher(small_config())
    with pytest.raises(MixretError, match="trained on 32-dim embeddings, got query dim 16"):
        m(torch.randn(2, 16), torch.randn(2, 5, 16))
    with pytest.raises(MixretError, match="1 to 31 candidates"):
        m(torch.randn(2, E), torch.randn(2, 32, E))
    with pytest.raises(MixretError, match="must be an integer >= 3"):
        MatcherConfig(emb_dim=E, context=2)


# -- save / load ------------------------------------------------------------------------------

def test_save_load_round_trip(trained, tmp_path):
    matcher, _, out, (q, t) = trained
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["kind"] == "matcher" and cfg["emb_dim"] == E
    loaded = Matcher.from_pretrained(out)
    assert torch.equal(loaded.target_mean, matcher.target_mean)
    qs, cands = torch.from_numpy(q[:10]), torch.from_numpy(t[:310]).view(10, 31, E)
    np.testing.assert_array_equal(score_candidates(loaded, qs, cands), score_candidates(matcher, qs, cands))
    loaded.save_pretrained(tmp_path / "again")
    again = Matcher.from_pretrained(tmp_path / "again")
    np.testing.assert_array_equal(score_candidates(again, qs, cands), score_candidates(matcher, qs, cands))


def test_load_wrong_kind(trained, tmp_path):
    from mixret.models import ModelConfig, build_model, load
    _, _, out, _ = trained
    clm = build_model(ModelConfig(arch="llama", vocab_size=64, d_model=32, n_layers=1, context=16, n_heads=2))
    clm.save_pretrained(tmp_path / "clm")
    with pytest.raises(MixretError, match=r"not a mixret matcher \(kind='clm'.*mixret.load"):
        Matcher.from_pretrained(tmp_path / "clm")
    with pytest.raises(MixretError, match="not a mixret language model"):
        load(out)
    with pytest.raises(MixretError, match="matcher directory not found"):
        Matcher.from_pretrained(tmp_path / "missing")


# -- command line -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    """An untrained byte-level language model folder and 120 pairs that share nothing but their id."""
    from mixret.models import ModelConfig, build_model
    from mixret.tokenizer import ByteTokenizer
    root = tmp_path_factory.mktemp("cli")
    tok = ByteTokenizer()
    lm = build_model(ModelConfig(arch="masked-mixer", vocab_size=tok.vocab_size, d_model=32, n_layers=1, context=32))
    lm.save_pretrained(root / "lm", tokenizer=tok)
    pairs = root / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"id": f"p{i}", "summary": f"query {i} {i * 7 % 13}",
                                         "document": f"document {i} words {i % 5}"}) + "\n" for i in range(120)))
    return root


def test_cli_train_matcher(tiny_lm, tmp_path):
    from click.testing import CliRunner

    from mixret.cli import main
    out = tmp_path / "m"
    args = ["train-matcher", "--pairs", str(tiny_lm / "pairs.jsonl"), "--context", "8", "--epochs", "1",
            "--d-model", "16", "--layers", "1", "--test-fraction", "0.3", "--out", str(out)]
    res = CliRunner().invoke(main, args + ["--model", str(tiny_lm / "lm")])
    assert res.exit_code == 0, res.output
    assert "matcher, test" in res.output and "chance" in res.output and "cosine, test" in res.output
    assert "in-set scores" in res.output and "not retrieval over a corpus" in res.output
    assert "matcher, test, padded" in res.output
    m = Matcher.from_pretrained(out)
    assert m.config.emb_dim == 32 and m.config.context == 8 and m.config.embedder
    assert json.loads((out / "metrics.json").read_text())["n_candidates"] == 7

    # the same from embedding folders, matched to the pairs by id; the wrong field is refused
    from mixret.retrieval.embeddings import embed_corpus
    for field in ("summary", "document"):
        embed_corpus(tiny_lm / "lm", tiny_lm / "pairs.jsonl", tmp_path / field, field=field, show_progress_bar=False)
    res = CliRunner().invoke(main, args + ["--query-emb", str(tmp_path / "summary"),
                                           "--target-emb", str(tmp_path / "document")])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(main, args + ["--query-emb", str(tmp_path / "document"),
                                           "--target-emb", str(tmp_path / "document")])
    assert res.exit_code == 1 and "differs from the pairs' query text" in res.output
    res = CliRunner().invoke(main, args[:-2] + ["--out", str(tiny_lm / "lm"), "--model", str(tiny_lm / "lm")])
    assert res.exit_code == 1 and "does not hold a matcher" in res.output


def test_cli_train_matcher_stop_after_and_resume(tiny_lm, tmp_path):
    from click.testing import CliRunner

    from mixret.cli import main
    out = tmp_path / "m"
    args = ["train-matcher", "--pairs", str(tiny_lm / "pairs.jsonl"), "--model", str(tiny_lm / "lm"), "--context", "8",
            "--epochs", "2", "--batch-size", "16", "--d-model", "16", "--layers", "1", "--test-fraction", "0.3",
            "--out", str(out)]
    res = CliRunner().invoke(main, args + ["--stop-after", "3"])
    assert res.exit_code == 0, res.output
    assert "checkpoint written to" in res.output and "--resume" in res.output
    assert not (out / "config.json").exists() and (out / "checkpoints" / "step-000003").is_dir()
    res = CliRunner().invoke(main, args + ["--resume"])
    assert res.exit_code == 0, res.output
    assert "resuming from" in res.output and f"matcher written to {out}" in res.output
    steps = json.loads((out / "train_config.json").read_text())["steps"]
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()][-1] == steps
    res = CliRunner().invoke(main, [a if a != "16" else "24" for a in args] + ["--resume"])  # another d_model
    assert res.exit_code == 1 and "holds a different model" in res.output and "d_model" in res.output
