"""Smoke tests of the benchmark scripts at tiny sizes: they run and write their tables, JSON and plots.

No timing is asserted: these are benchmarks, measured by hand (docs/benchmarks.md).
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "scripts"
sys.path.insert(0, str(SCRIPTS))

import bench_budget  # noqa: E402
import bench_common  # noqa: E402
import bench_hypermixer  # noqa: E402
import bench_train  # noqa: E402
from close import assert_close  # noqa: E402


def run_script(name: str, out: Path, *extra: str) -> dict:
    proc = subprocess.run([sys.executable, str(SCRIPTS / f"bench_{name}.py"), "--quick", "--threads", "1",
                           "--device", "cpu", "--out", str(out), *extra],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    md = (out / f"{name}.md").read_text()
    assert md.startswith("## ") and "|---" in md and "torch" in md
    return json.loads((out / f"{name}.json").read_text())


def assert_png(path: Path):
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_train(tmp_path):
    data = run_script("train", tmp_path, "--archs", "flat,llama", "--contexts", "32")
    assert {r["arch"] for r in data["rows"]} == {"flat", "llama"}
    assert all(r["status"] == "ok" and r["tok_s"] > 0 and r["peak_mib"] is not None for r in data["rows"])
    (pair,) = data["flat_vs_llama"]
    assert pair["context"] == 32 and pair["speed"] > 0
    assert data["machine"]["threads"] == 1
    assert_png(tmp_path / "train.png")


def test_bench_mixing(tmp_path):
    data = run_script("mixing", tmp_path)
    assert [r["context"] for r in data["rows"]] == [64, 160]
    for r in data["rows"]:
        assert all(r[f"{m}_{k}_ms"] > 0 for m in ("einsum", "dense", "blocked") for k in ("fwd", "train"))
        assert "blocked_max_diff" in r  # reported with each row; what it compares is tested below
    assert_png(tmp_path / "mixing.png")


@pytest.mark.parametrize("L,block", [(70, 16), (64, 64), (33, 8)])
def test_bench_mixing_times_the_products_it_names(L, block):
    """What the mixing benchmark times: its einsum and blocked products are the masked product, forward and
    backward (so comparing their times means something), and its dense product is the unmasked one."""
    import bench_mixing
    torch.manual_seed(0)
    w = torch.randn(L, L, requires_grad=True)
    x = torch.randn(3, L, 5, requires_grad=True)
    g = torch.randn(3, L, 5)
    tril = torch.ones(L, L).tril()

    def run(fn):
        w.grad = x.grad = None
        y = fn(w, x, tril)
        y.backward(g)
        return y.detach(), w.grad.clone(), x.grad.clone()

    w64, x64 = w.detach().double(), x.detach().double()
    reference = torch.einsum("ts,bsd->btd", w64 * tril.double(), x64)  # in float64
    for fn in (bench_mixing.einsum, lambda *a: bench_mixing.blocked(*a, block)):
        y, gw, gx = run(fn)
        assert_close(y, reference)
        assert_close(gw, torch.einsum("btd,bsd->ts", g.double(), x64) * tril.double())
        assert_close(gx, torch.einsum("ts,btd->bsd", w64 * tril.double(), g.double()))
    dense = run(bench_mixing.dense)[0]
    assert_close(dense, torch.einsum("ts,bsd->btd", w64, x64))
    assert (dense - reference).abs().max() > 0.1  # the mask matters: dense is the product without it


@pytest.mark.slow  # four child processes; bench_train's children and the fits are tested in the default run
def test_bench_hypermixer(tmp_path):
    data = run_script("hypermixer", tmp_path, "--contexts", "32")  # the fits are tested below
    assert len(data["rows"]) == 2 and all(r["status"] == "ok" for r in data["rows"])
    assert {(f["variant"], f["quantity"]) for f in data["fits"]} == {
        (v, q) for v in ("hypermixer", "masked-mixer (flat)") for q in ("time (ms)", "memory (MiB)")}
    assert_png(tmp_path / "hypermixer.png")


def test_bench_retrieval(tmp_path):
    data = run_script("retrieval", tmp_path)
    assert {r["variant"] for r in data["embed"]} == {"masked-mixer (flat)", "llama"}
    flat = next(r for r in data["faiss"] if r["factory"] == "Flat")
    assert flat["recall_at_10"] == 1.0
    assert [r["factory"] for r in data["faiss"]] == ["Flat", "HNSW32", "IVF32,PQ32np"]
    (tree,) = data["tree"]
    assert tree["passes"] == tree["formula"] == 5  # ceil((100 - 10) / (31 - 10))
    assert_png(tmp_path / "retrieval.png")


def test_bench_generate(tmp_path):
    data = run_script("generate", tmp_path)
    assert all(r["same_tokens"] for r in data["rows"])


@pytest.mark.slow  # a server and four `mixret search` processes; mixret serve itself is tested in test_serve.py
def test_bench_serve(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPTS / "bench_serve.py"), "--quick", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| mode | clients | req/s | p50 ms |" in (tmp_path / "serve.md").read_text()
    data = json.loads((tmp_path / "serve.json").read_text())
    assert {(r["mode"], r["clients"]) for r in data["rows"]} == {(m, c) for m in data["cli_s"] for c in (1, 4)}
    assert set(data["cli_s"]) >= {"vector", "tree", "hybrid", "bm25"}
    for r in data["rows"]:
        assert r["requests"] == 20 and r["p50_ms"] <= r["p95_ms"] <= r["p99_ms"] and r["mean_batch"] >= 1


def test_fit_and_exponent():
    xs = [256, 512, 1024, 2048]
    line = bench_hypermixer.fit(xs, [3 + 2 * x for x in xs], 1)
    assert line["coef"] == pytest.approx([3, 2]) and line["r2"] == pytest.approx(1)
    assert bench_hypermixer.fit(xs, [x * x for x in xs], 1)["r2"] < 0.99
    assert bench_hypermixer.exponent(xs, [x * x for x in xs]) == pytest.approx(2)


def test_flops_per_token_counts_linears_and_mixing():
    from mixret.models import ModelConfig, build_model
    flat = build_model(ModelConfig(arch="masked-mixer", vocab_size=100, d_model=16, n_layers=2, context=64))
    llama = build_model(ModelConfig(arch="llama", vocab_size=100, d_model=16, n_layers=2, context=64))
    # flat: two FF matrices per block and the LM head; the mixing matrices are counted by the L term
    assert bench_train.linear_weights(flat) == 2 * (2 * 16 * 64) + 16 * 100
    assert bench_train.flops_per_token(flat, 64) == 6 * bench_train.linear_weights(flat) + 2 * 6 * 64 * 16
    assert (bench_train.flops_per_token(llama, 64) - 6 * bench_train.linear_weights(llama)) == 2 * 12 * 64 * 16


def test_markdown_table_formats_numbers():
    table = bench_common.markdown_table([{"a": "x", "b": 12345.678, "c": None}, {"a": "y", "b": 0.012345}],
                                        [("a", "name"), ("b", "value"), ("c", "other")])
    lines = table.splitlines()
    assert lines[0] == "| name | value | other |" and lines[1] == "|---|---:|---|"
    assert lines[2] == "| x | 12,346 | - |" and lines[3] == "| y | 0.0123 | - |"


def test_best_time_takes_the_minimum():
    calls = []
    assert bench_common.best_time(lambda: calls.append(1), torch.device("cpu"), repeats=3, warmup=2) >= 0
    assert len(calls) == 5


def test_step_estimate_extrapolates_time_per_token():
    assert bench_train.estimate_step([], 512, 2048) == 0.0
    assert bench_train.estimate_step([(128, 1e-3)], 512, 2048) == pytest.approx(2.048)
    # 1 ms/token at 2048, 2 ms/token at 4096: 4 ms/token at 8192
    assert bench_train.estimate_step([(2048, 1e-3), (4096, 2e-3)], 8192, 8192) == pytest.approx(8192 * 4e-3)
    # never below the last measured time per token
    assert bench_train.estimate_step([(128, 2e-3), (512, 1e-3)], 2048, 2048) == pytest.approx(2.048)


def test_bench_budget(tmp_path):
    # three tiny runs of one arch: fine-tuning only, then half the budget on CLM or on spans first
    data = run_script("budget", tmp_path, "--budgets", "0.02", "--shares", "0,50", "--archs", "masked-mixer",
                      "--recipes", "clm,spans")
    rows = data["rows"]
    assert [(r["arch"], r["share"], r["recipe"]) for r in rows] == [
        ("masked-mixer", 0, "finetune"), ("masked-mixer", 50, "clm"), ("masked-mixer", 50, "spans")]
    assert all(r["status"] == "ok" for r in rows)
    for r in rows:
        assert r["finetune_steps"] >= 1 and r["pooling"] == "last"
        assert r["pretrain_steps"] >= 1 if r["share"] else r["pretrain_steps"] == 0
    clm, spans = rows[1], rows[2]
    assert clm["pretrain_val_loss"] > 0 and clm["pretrain_val_r1"] is None        # next-token prediction
    assert spans["pretrain_val_loss"] is None and 0 <= spans["pretrain_val_r1"] <= 1  # the span objective
    for r in rows:
        for key in ("vector_r1", "vector_mrr10", "fusion_r1", "fusion_mrr10"):
            assert 0.0 <= r[key] <= 1.0
        assert r["n_test_pairs"] == r["corpus_size"] > 0 and r["load_start"] >= 0
    assert data["bm25"]["same_in_every_run"] and 0.0 < data["bm25"]["R@1"] <= 1.0
    assert "load_end" in data["machine"]
    assert_png(tmp_path / "budget.png")


def test_budget_comparisons_pair_archs_at_equal_budget():
    row = lambda arch, budget, share, v, f: {"arch": arch, "budget": budget, "share": share, "vector_r1": v,  # noqa: E731
                                            "fusion_r1": f, "finetune_steps": 10}
    rows = [row("masked-mixer", 2.0, 0, 0.5, 0.8), row("llama", 2.0, 0, 0.25, 0.75),
            row("masked-mixer", 5.0, 0, 0.6, 0.9), row("llama", 2.0, 50, 0.1, 0.7)]
    (c,) = bench_budget.comparisons(rows)  # only (2 min, 0 %) has both archs
    assert (c["budget"], c["share"]) == (2.0, 0)
    assert c["vector_diff"] == pytest.approx(0.25) and c["fusion_diff"] == pytest.approx(0.05)
    assert c["vector_ratio"] == pytest.approx(2.0)


def test_bench_recipe(tmp_path):
    from planted import planted_pairs

    from mixret.data import write_pairs_jsonl
    write_pairs_jsonl(planted_pairs(120), tmp_path / "select.jsonl")
    data = run_script("recipe", tmp_path, "--select-pairs", str(tmp_path / "select.jsonl"),
                      "--recipes", "bpe 4k,bpe-lower 2k + dropout 0.1")
    rows = data["rows"]
    assert [r["recipe"] for r in rows] == ["bpe 4k", "bpe-lower 2k + dropout 0.1"]
    for r in rows:
        assert "status" not in r and r["steps"] >= 1 and r["select_n"] == 120 and r["test_n"] == 80
        for key in ("select_vector_r1", "select_fusion_r1", "select_bm25_r1", "test_vector_r1", "test_fusion_r1"):
            assert 0.0 <= r[key] <= 1.0
    assert rows[0]["select_bm25_r1"] == rows[1]["select_bm25_r1"]     # the same pairs for every recipe


def test_bench_corpus(tmp_path):
    data = run_script("corpus", tmp_path)
    assert [r["docs"] for r in data["rows"]] == [1000, 3000]
    assert all(r["recompute_s"] > 0 and r["term_ids_s"] > 0 and r["keep_terms_s"] > 0 for r in data["rows"])
    assert all(r["max_score_diff"] == 0 and r["max_score_diff_term_ids"] == 0 for r in data["rows"])  # the same index


def test_bench_backend(tmp_path):
    data = run_script("backend", tmp_path, "--qdrant-max", "0")   # Qdrant's local mode loads too slowly for a smoke test
    rows = {r["backend"]: r for r in data["rows"]}
    assert {"faiss", "milvus"} <= set(rows) and "qdrant" not in rows
    assert all(r["exact"] == 1.0 and r["p50_ms"] > 0 for r in rows.values())   # FLAT answers FAISS's top 10
    assert any(r["backend"] == "milvus" and r["added_mib"] > 0 for r in data["sizes"])


@pytest.mark.slow  # three servers; the writes themselves are tested in test_serve_writes.py
def test_bench_serve_mixed(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPTS / "bench_serve.py"), "--quick", "--mixed", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads((tmp_path / "serve_mixed.json").read_text())
    assert [r["write_rate"] for r in data["rows"]] == [0.0, 2.0, 10.0]
    assert data["rows"][0]["docs_written"] == 0 and all(r["docs_written"] > 0 for r in data["rows"][1:])
    assert data["adds_docs_s"] > 0 and data["rebuild_s"] > 0 and data["log_lines"] > 0


@pytest.mark.slow
def test_bench_distill(tmp_path, monkeypatch):
    pytest.importorskip("sentence_transformers")
    from planted import planted_documents, planted_pairs

    from mixret.data import write_pairs_jsonl
    from st_models import tiny_st_model
    teacher = tiny_st_model(tmp_path / "teacher", planted_documents())
    monkeypatch.setenv("MIXRET_CACHE", str(tmp_path / "cache"))
    select = tmp_path / "select.jsonl"                     # pairs outside the bundled corpus: the selection set
    write_pairs_jsonl(planted_pairs(), select)
    data = run_script("distill", tmp_path / "out", "--teacher", str(teacher), "--variants",
                      "masked-mixer:cosine,llama:cosine", "--finetune-minutes", "0.05", "--select-pairs", str(select))
    assert [(r["student"], r["recipe"].split(",")[0].split(" ")[0]) for r in data["rows"]] == [
        ("masked-mixer d32 x 1", "distilled"), ("masked-mixer d32 x 1", "distilled"),
        ("llama d32 x 1", "distilled"), ("llama d32 x 1", "distilled"),
        ("masked-mixer d32 x 1", "fine-tuned"), ("llama d32 x 1", "fine-tuned")]
    distilled, then_tuned = data["rows"][0], data["rows"][1]
    assert then_tuned["recipe"] == "distilled, then fine-tuned 0.05 min" and then_tuned["ft_steps"] >= 1
    assert then_tuned["steps"] == distilled["steps"] >= 1 and "ft_steps" not in distilled
    assert data["rows"][4]["minutes"] == pytest.approx(0.1)          # the reference: the student's whole time
    for r in [data["teacher"], *data["rows"]]:
        assert r["docs_per_s"] > 0 and r["selection_n"] == 200 and r["test_n"] == 60
        for mode in ("vector", "fusion", "bm25"):
            total = (r[f"test_{mode}_r1"] * 60 + r[f"selection_{mode}_r1"] * 200) / 260
            assert r[f"all_{mode}_r1"] == pytest.approx(total, abs=1e-4)
    assert data["teacher"]["texts"] == 300 and data["teacher"]["seconds"] is not None
    assert_png(tmp_path / "out" / "distill.png")
