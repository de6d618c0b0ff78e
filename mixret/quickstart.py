"""The main job: the whole pipeline on the bundled corpus, a masked mixer against a llama baseline.

Pretrain both models with the same size and compute (steps x batch x context), embed, train a matcher on each
model's embeddings, index, evaluate every search mode on the held-out pairs, and print one comparison table.
Everything goes under one output directory.
"""
from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from mixret import io
from mixret.errors import MixretError

ARCHS = ("masked-mixer", "llama")
POOLINGS = ("last", "eos", "mean")
PRETRAIN_SHARE = 0.4  # of --budget-minutes, for pretraining both models (the README and --help say 40 %)


@dataclass
class QuickstartConfig:
    out: str = "quickstart-out"
    budget_minutes: float = 12.0     # wall-clock target for the whole run (pretraining gets PRETRAIN_SHARE)
    d_model: int = 128
    layers: int = 4
    context: int = 256
    batch_size: int = 16
    max_pairs: int | None = None     # use only the first N bundled pairs (for quick trials)
    tree_queries: int = 100          # tree mode scores the whole corpus per query: run it on a sample
    matcher_pairs: int = 3000        # training pairs the matcher sees (each is embedded by both models)
    matcher_epochs: int = 10
    matcher_d_model: int = 128
    matcher_layers: int = 2
    seed: int = 0


def plan_steps(cfg: QuickstartConfig, seconds: float, sample_lengths: list[int]) -> int:
    """Pretraining steps for each model so that both pretraining runs together take about `seconds`.

    Times a few optimizer steps of each architecture on a batch of typical length on this machine.
    """
    from mixret.models import ModelConfig, build_model
    L = int(min(cfg.context, np.percentile(sample_lengths, 90)))
    per_step = 0.0
    for arch in ARCHS:
        torch.manual_seed(cfg.seed)
        model = build_model(ModelConfig(arch=arch, vocab_size=4096, d_model=cfg.d_model, n_layers=cfg.layers,
                                        context=cfg.context))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        ids = torch.randint(0, 4096, (cfg.batch_size, L))
        times = []
        for _ in range(4):
            start = time.perf_counter()
            model(ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
            times.append(time.perf_counter() - start)
        per_step += min(times[1:])
    return int(np.clip(seconds / per_step, 20, 20000))


def run(cfg: QuickstartConfig, echo: Callable[[str], None] = print) -> dict:
    """Run the whole pipeline; returns the report (also written to OUT/results.json and OUT/results.md)."""
    import warnings
    with warnings.catch_warnings():
        # long documents are cut to the context throughout; said once here rather than at every encode
        warnings.filterwarnings("ignore", message=r".*longer than \d+ tokens and were truncated")
        echo(f"(texts longer than the context of {cfg.context} tokens are truncated, keeping their start)")
        return _run(cfg, echo)


def _run(cfg: QuickstartConfig, echo: Callable[[str], None]) -> dict:
    from mixret.data import BUNDLED_TEST_FRACTION, bundled_pairs_path, bundled_splits, sources_record, write_pairs_jsonl
    from mixret.embed import EmbeddingSpec, embed_corpus, encode
    from mixret.evaluate import evaluate_pairs
    from mixret.matcher import MatcherConfig, dedupe_queries, drop_repeated_queries, train_matcher
    from mixret.models import load
    from mixret.search import VectorIndex
    from mixret.train import TrainConfig, pretrain

    if cfg.budget_minutes <= 0:
        raise MixretError(f"--budget-minutes must be positive, got {cfg.budget_minutes}")
    t0 = time.perf_counter()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)

    # 1. data: the bundled pairs, split by a hash of the id; only the train split is used for pretraining
    train, test = bundled_splits()
    if cfg.max_pairs:
        train, test = train[:cfg.max_pairs], test[:max(cfg.max_pairs // 9, 40)]
    train, _ = drop_repeated_queries(train)
    test, _ = drop_repeated_queries(test)
    data_dir = out / "data"
    write_pairs_jsonl(train, data_dir / "train.jsonl.gz")
    write_pairs_jsonl(test, data_dir / "test.jsonl.gz")
    echo(f"== data: {len(train)} train pairs, {len(test)} test pairs (bundled Debian descriptions) -> {data_dir}")

    # 2. pretraining: same size, steps, batch and context for both architectures
    from mixret.tokenizer import ByteTokenizer
    lengths = [len(ByteTokenizer().encode(p.target)) // 4 for p in train[:500]]  # ~4 bytes a BPE token
    steps = plan_steps(cfg, 60 * cfg.budget_minutes * PRETRAIN_SHARE, lengths)
    echo(f"== pretraining {', '.join(ARCHS)}: {steps} steps of {cfg.batch_size} sequences each "
         f"(d_model {cfg.d_model}, {cfg.layers} layers, context {cfg.context})")
    model_dirs, pretrain_seconds = {}, {}
    for arch in ARCHS:
        start = time.perf_counter()
        tc = TrainConfig(data=[str(data_dir / "train.jsonl.gz")], text_field=["summary", "document"], arch=arch,
                         d_model=cfg.d_model, layers=cfg.layers, context=cfg.context, batch_size=cfg.batch_size,
                         steps=steps, eval_every=max(steps // 4, 1), seed=cfg.seed, out=str(out / "runs" / arch),
                         overwrite=True, tokenizer="bpe")
        model_dirs[arch] = pretrain(tc)
        pretrain_seconds[arch] = time.perf_counter() - start
        echo(f"   {arch}: {pretrain_seconds[arch]:.0f} s -> {model_dirs[arch]}")

    report = {"config": dataclasses.asdict(cfg), "steps": steps, "n_train": len(train), "n_test": len(test),
              "n_matcher_train": min(cfg.matcher_pairs, len(train)),
              "models": {}, "pooling": {}}
    for arch in ARCHS:
        model = load(model_dirs[arch])
        val = _final_val_loss(Path(model_dirs[arch]))
        # 3. matcher on last-token embeddings of the training pairs
        mtrain = train[:cfg.matcher_pairs]
        echo(f"== {arch}: embedding {2 * (len(mtrain) + len(test))} texts, training the matcher")
        q = encode(model, [p.query for p in mtrain + test])
        t = encode(model, [p.target for p in mtrain + test])
        n = len(mtrain)
        (tq, tt, _), (sq, st, _) = dedupe_queries(q[:n], t[:n]), dedupe_queries(q[n:], t[n:])
        spec = EmbeddingSpec(io.file_hash(Path(model_dirs[arch]) / io.WEIGHTS_NAME), "last", model.config.context)
        mcfg = MatcherConfig(emb_dim=q.shape[1], context=32, d_model=cfg.matcher_d_model,
                             n_layers=cfg.matcher_layers, embedder=spec.model_hash, pooling=spec.pooling,
                             max_length=spec.max_length,
                             trained_on=sources_record([bundled_pairs_path()], BUNDLED_TEST_FRACTION))
        matcher, mmetrics = train_matcher(tq, tt, sq, st, mcfg, epochs=cfg.matcher_epochs, seed=cfg.seed,
                                          out_dir=out / "matchers" / arch, progress=False)
        # 4. index the test documents (the corpus searched by `mixret search` below)
        emb_dir = out / "emb" / arch
        embed_corpus(model_dirs[arch], data_dir / "test.jsonl.gz", emb_dir, field="document", overwrite=True)
        emb, *_ = _load_emb(emb_dir)
        VectorIndex.build(emb, "Flat", meta={**spec.to_dict(),
                                             "model_path": str(Path(model_dirs[arch]).resolve())}).save(emb_dir)
        # 5. every mode on the held-out pairs; tree on a sample of queries
        echo(f"== {arch}: evaluating vector, hybrid, tree ({min(cfg.tree_queries, len(test))} queries), bm25")
        rep = evaluate_pairs(test, model, matcher, modes=["vector", "hybrid", "bm25"])
        tree = evaluate_pairs(test, model, matcher, modes=["tree"], limit=cfg.tree_queries)
        rep["modes"]["tree"] = tree["modes"]["tree"]
        rep["tree_queries"] = tree["n_queries"]
        report["models"][arch] = {"dir": str(model_dirs[arch]), "val_loss": val, "params": model.num_params(),
                                  "pretrain_seconds": pretrain_seconds[arch], "matcher": _matcher_summary(mmetrics),
                                  "eval": rep}
        # 6. which position to embed: the last content token, an appended end-of-text token, or the mean
        report["pooling"][arch] = {p: rep["modes"]["vector"] if p == "last" else
                                   evaluate_pairs(test, model, modes=["vector"], pooling=p)["modes"]["vector"]
                                   for p in POOLINGS}
    report["chance"] = rep["chance"]
    report["seconds"] = time.perf_counter() - t0
    report["machine"] = machine_description()
    io.write_json(out / "results.json", report)
    io.atomic_write_text(out / "results.md", format_report(report) + "\n")
    echo("")
    echo(format_report(report))
    echo(f"\n(results written to {out / 'results.md'} and {out / 'results.json'}; {report['seconds'] / 60:.1f} min)")
    return report


def example_search(report: dict, cfg: QuickstartConfig) -> list[str]:
    """Arguments of one `mixret search` call on the masked mixer's index: hybrid mode, the first test query."""
    from mixret.data import load_pairs
    out = Path(cfg.out)
    query = load_pairs(out / "data" / "test.jsonl.gz")[0].query
    return ["search", query, "--index", str(out / "emb" / ARCHS[0]), "--matcher", str(out / "matchers" / ARCHS[0]),
            "--mode", "hybrid", "-k", "5"]


def _final_val_loss(run_dir: Path) -> float | None:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    vals = [r["val_loss"] for r in map(json.loads, path.read_text().splitlines()) if r.get("val_loss") is not None]
    return vals[-1] if vals else None


def _load_emb(emb_dir: Path):
    from mixret.embed import load_emb_dir
    return load_emb_dir(emb_dir)


def _matcher_summary(m: dict) -> dict:
    test = m.get("test", {})
    return {"test_ce": test.get("ce"), "test_top1": test.get("top1"), "chance_ce": m.get("chance_ce"),
            "cosine_top1": m.get("test_cosine", {}).get("top1"),
            "steps_to_leave_chance": m.get("steps_to_leave_chance")}


def machine_description() -> str:
    import platform
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {torch.get_num_threads()} threads, {dev}, torch {torch.__version__}"


def format_report(report: dict) -> str:
    """The comparison table (markdown) and the pooling and matcher side tables."""
    cols = ("R@1", "R@10", "MRR@10", "nDCG@10")
    any_eval = next(iter(report["models"].values()))["eval"]
    lines = [f"Retrieval of {any_eval['n_queries']} held-out Debian package summaries among their "
             f"{any_eval['corpus_size']} documents (tree: first {any_eval.get('tree_queries')} queries). "
             f"Pretraining: {report['steps']} steps each on {report['n_train']} training pairs; matchers trained "
             f"on {report['n_matcher_train']} of them; machine: {report['machine']}.", "",
             "| model | mode | " + " | ".join(cols) + " | queries/s | matcher passes/query |",
             "|---|---|" + "---:|" * (len(cols) + 2)]
    bm25_done = False
    for arch, m in report["models"].items():
        for mode in ("vector", "tree", "hybrid", "bm25"):
            if mode == "bm25":
                if bm25_done:
                    continue
                bm25_done = True
            r = m["eval"]["modes"][mode]
            name = "-" if mode == "bm25" else arch
            passes = f"{r['passes_per_query']:.1f}" if r.get("passes_per_query") is not None else "-"
            qps = f"{r['queries_per_s']:.1f}" if r.get("queries_per_s") else "-"
            lines.append(f"| {name} | {mode} | " + " | ".join(f"{r[c]:.3f}" for c in cols) + f" | {qps} | {passes} |")
    ch = report["chance"]
    lines.append("| - | chance | " + " | ".join(f"{ch[c]:.3f}" if c in ch else "-" for c in cols) + " | - | - |")
    lines += ["", "Models and matchers:", "",
              "| model | parameters | pretrain s | val loss | matcher test CE (chance) | matcher top-1 of 31 |",
              "|---|---:|---:|---:|---:|---:|"]
    for arch, m in report["models"].items():
        mm = m["matcher"]
        val = f"{m['val_loss']:.3f}" if m["val_loss"] is not None else "-"
        ce = f"{mm['test_ce']:.3f} ({mm['chance_ce']:.3f})" if mm["test_ce"] is not None else "-"
        top1 = f"{mm['test_top1']:.3f}" if mm["test_top1"] is not None else "-"
        lines.append(f"| {arch} | {m['params']:,} | {m['pretrain_seconds']:.0f} | {val} | {ce} | {top1} |")
    lines += ["", "Which position is embedded (vector search, R@1 / MRR@10): last content token, an appended "
              "end-of-text token, mean of the text's tokens (bos left out):", "",
              "| model | " + " | ".join(POOLINGS) + " |", "|---|" + "---:|" * len(POOLINGS)]
    for arch, per in report["pooling"].items():
        lines.append(f"| {arch} | " + " | ".join(f"{per[p]['R@1']:.3f} / {per[p]['MRR@10']:.3f}"
                                                 for p in POOLINGS) + " |")
    return "\n".join(lines)
