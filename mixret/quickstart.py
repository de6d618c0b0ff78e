"""The main job: the whole pipeline on one set of pairs, a masked mixer against a llama baseline at equal time.

Each architecture gets the same wall-clock training budget (not the same steps): an optional share of it for
CLM pretraining on the training texts, the rest for contrastive fine-tuning on the training pairs (which also
fits BM25's k1, b and stemmer and the fusion weight on a validation slice of them). Then, per model: a matcher
trained on the fine-tuned embeddings, the test documents embedded and indexed (with the fitted BM25), and every
search mode evaluated on the held-out pairs beside the fitted BM25, the default one and TF-IDF (scikit-learn's, a
second lexical baseline; mixret.retrieval.tfidf), in one comparison table; every won/lost count is against the
fitted BM25. Everything goes under one output directory.

The pairs are the bundled Debian corpus (split by a hash of the id) unless `pairs` and `test_pairs` name a
user's own files.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from mixret import io
from mixret.data import bundled_splits, drop_repeated_queries, load_pairs, split_pairs, write_pairs_jsonl
from mixret.errors import MixretError
from mixret.models.config import ModelConfig
from mixret.models.encode import encode
from mixret.models.matcher import MatcherConfig
from mixret.models.zoo import load
from mixret.options import option
from mixret.retrieval.bm25 import BM25Params, copy_to_emb_dir, load_bm25
from mixret.retrieval.embeddings import embed_corpus, load_emb_dir
from mixret.retrieval.evaluate import evaluate_pairs, format_paired
from mixret.retrieval.fusion import FUSION_NAME, Fusion
from mixret.retrieval.index import VectorIndex
from mixret.tokenizer import make_tokenizer
from mixret.training.baseline import BaselineConfig, STEncoder, train_baseline
from mixret.training.finetune import FINETUNE_LOOP, HARD_NEGATIVES, FinetuneConfig, finetune
from mixret.training.loop import TRAIN_CONFIG_NAME, LoopConfig, last_metric
from mixret.training.matcher import matcher_on_pairs
from mixret.training.pretrain import TrainConfig, pretrain

ARCHS = ("masked-mixer", "llama")
TRAIN_SHARE = 0.7        # of the budget, for training the architectures (side by side, or half each); the rest: the
                         # pipeline
MIN_TEST_PAIRS = 40
NEWS_EVERY = 30         # seconds between progress lines while the architectures train side by side
MATCHER_CONTEXT = 32     # the matcher's slots: the query and 31 candidates


@dataclass
class QuickstartConfig:
    """Everything `mixret quickstart` takes; `run(QuickstartConfig())` is the command with no options."""
    out: str = option("quickstart-out", "Folder for everything the run writes (models, matchers, embeddings, "
                                        "results).")
    budget_minutes: float = option(14.0, "Target wall-clock time of the whole run; 70 % of it trains the two models "
                                         "(side by side on a CPU, each on half the threads; one after the other on a "
                                         "GPU).")
    pairs: str | None = option(None, "Your own training pairs (any pairs format mixret reads).",
                               show="the bundled Debian pairs")
    test_pairs: str | None = option(None, "Your own held-out pairs.", show="the test split of --pairs (by a hash of "
                                                                            "the id)")
    query_field: str = option("summary", "Pairs field with the queries.")
    target_field: str = option("document", "Pairs field with the documents.")
    pretrain_share: float = option(0.0, "Share of each model's training time spent on CLM pretraining before "
                                        "contrastive fine-tuning.")
    d_model: int = option(256, "Width of both language models.")
    layers: int = option(4, "Blocks of both language models.")
    context: int = option(256, "Context of both language models.")
    batch_size: int = option(32, "Fine-tuning pairs per step.")
    hard_negatives: str = option("none", "Fine-tuning: bm25 adds each query's highest-ranked wrong document to its "
                                         "batch.", choices=HARD_NEGATIVES)
    max_pairs: int | None = option(None, "Use only this many training pairs (for quick trials).")
    tree_queries: int = option(100, "Queries evaluated in tree mode (it scores the whole corpus per query).")
    matcher_pairs: int = option(3000, "Training pairs the matchers see.")
    matcher_epochs: int = option(10, "Matcher training epochs.")
    matcher_d_model: int = option(128, "Matcher width.")
    matcher_layers: int = option(2, "Matcher blocks.")
    baseline: str | None = option(
        None, "A sentence-transformers model (hub name or folder) to compare with: after the mixret models, it is "
              "fine-tuned with MultipleNegativesRankingLoss on the same training pairs for the same minutes and "
              "threads each of them had (outside the budget), its fusion weight fitted on the same validation slice, "
              "and scored in the same table (vector and fusion, won/lost against the same fitted BM25, documents "
              "embedded per second). Needs pip install 'mixret[st]'.")
    seed: int = option(0, "Seed of every model, matcher and sample.")

    def validate(self) -> None:
        if not self.budget_minutes > 0:
            raise MixretError(f"--budget-minutes must be positive, got {self.budget_minutes}")
        if not 0.0 <= self.pretrain_share < 1.0:
            raise MixretError(f"--pretrain-share must be in [0, 1), got {self.pretrain_share}")
        if self.test_pairs is not None and self.pairs is None:
            raise MixretError("--test-pairs needs --pairs (the training pairs of the same corpus)")

    @property
    def train_minutes(self) -> float:
        """Wall-clock time of the training phase (every architecture, pretraining and fine-tuning together)."""
        return TRAIN_SHARE * self.budget_minutes


def run(cfg: QuickstartConfig, echo: Callable[[str], None] = print) -> dict:
    """Run the whole pipeline; returns the report (also written to OUT/results.json and OUT/results.md)."""
    import warnings
    cfg.validate()
    with warnings.catch_warnings():
        # long documents are cut to the context throughout; said once here rather than at every encode
        warnings.filterwarnings("ignore", message=r".*longer than \d+ tokens and were truncated")
        echo(f"(texts longer than the context of {cfg.context} tokens are truncated, keeping their start)")
        return _run(cfg, echo)


def load_split(cfg: QuickstartConfig) -> tuple[list, list, str]:
    """(train pairs, test pairs, where they come from), repeated queries dropped from each."""
    if cfg.pairs is None:
        train, test = bundled_splits()
        source = "bundled Debian descriptions, hash split"
    elif cfg.test_pairs is None:
        train, test = split_pairs(load_pairs(cfg.pairs, cfg.query_field, cfg.target_field), 0.1)
        source = f"{cfg.pairs}, hash split"
    else:
        train = load_pairs(cfg.pairs, cfg.query_field, cfg.target_field)
        test = load_pairs(cfg.test_pairs, cfg.query_field, cfg.target_field)
        source = f"{cfg.pairs} / {cfg.test_pairs}"
    if cfg.max_pairs:
        train, test = train[:cfg.max_pairs], test[:max(cfg.max_pairs // 9, MIN_TEST_PAIRS)]
    train, _ = drop_repeated_queries(train)
    test, _ = drop_repeated_queries(test)
    if len(test) < 2:
        raise MixretError(f"only {len(test)} test pairs; expected at least 2 to evaluate retrieval")
    return train, test, source


def train_model(arch: str, cfg: QuickstartConfig, data_dir: Path, out: Path, echo, minutes: float) -> dict:
    """Pretrain (its share of `minutes`) then fine-tune one architecture -> facts for the report."""

    facts = {"train_minutes": minutes, "pretrain_minutes": cfg.pretrain_share * minutes}
    init = arch
    if cfg.pretrain_share > 0:
        start = time.perf_counter()
        tc = TrainConfig(data=[str(data_dir / "train.jsonl.gz")], text_field=["summary", "document"], arch=arch,
                         tokenizer=str(data_dir / io.TOKENIZER_NAME), d_model=cfg.d_model, layers=cfg.layers,
                         context=cfg.context, mixing_init="mean", budget_minutes=cfg.pretrain_share * minutes,
                         eval_every=10**9, seed=cfg.seed, out=str(out / "runs" / f"{arch}-clm"), overwrite=True)
        init = str(pretrain(tc))
        facts.update(pretrain_dir=init, pretrain_seconds=time.perf_counter() - start,
                     pretrain_steps=io.read_json(Path(init) / TRAIN_CONFIG_NAME)["steps"],
                     val_loss=last_metric(Path(init), "val_loss"))
    start = time.perf_counter()
    model = ModelConfig(arch=arch, d_model=cfg.d_model, n_layers=cfg.layers, context=cfg.context,
                        mixing_init="mean", **({"n_heads": 4} if arch == "llama" else {}))
    fc = FinetuneConfig(pairs=str(data_dir / "train.jsonl.gz"), test_fraction=0.0, init=init, model=model,
                        tokenizer=str(data_dir / io.TOKENIZER_NAME),
                        batch_size=cfg.batch_size, hard_negatives=cfg.hard_negatives, seed=cfg.seed,
                        out=str(out / "runs" / arch), overwrite=True,
                        loop=LoopConfig(budget_minutes=(1 - cfg.pretrain_share) * minutes,
                                        **{**FINETUNE_LOOP, "eval_every": 10**9}))
    model_dir = finetune(fc)
    facts.update(dir=str(model_dir), finetune_seconds=time.perf_counter() - start, finetune_steps=fc.loop.steps,
                 val_r1=last_metric(model_dir, "val_r1"), val_fusion_r1=last_metric(model_dir, "val_fusion_r1"))
    echo(_trained_line(arch, facts))
    return facts


def train_tokenizer(train: list, data_dir: Path, echo) -> Path:
    """The tokenizer both architectures use (finetune's default kind and size, trained on the training pairs),
    written to data_dir/tokenizer.json. Trained once, here, rather than in each training run: side by side, one
    run's tokenizer training would otherwise compete with the other run's timing of its steps, and the budgets
    would come out short."""
    default = FinetuneConfig()
    path = data_dir / io.TOKENIZER_NAME
    make_tokenizer(default.tokenizer, default.vocab_size, lambda: [t for p in train for t in (p.query, p.target)],
                   lambda line: echo(f"== {line}"), f"the {len(train)} training pairs").save(path)
    return path


def side_by_side_threads() -> int:
    """Threads for each architecture when they train side by side (0: train one after the other).

    On a CPU with at least two threads the architectures train at the same time, each on its share of the
    threads, for the whole training time: a small model's steps use extra threads poorly (on 2 cores a masked
    mixer gets about 1.4 times the steps of half the time on both), and both see the same machine at the same
    moments. On a GPU they take turns.
    """
    if torch.cuda.is_available() or torch.get_num_threads() < len(ARCHS):
        return 0
    return torch.get_num_threads() // len(ARCHS)


def training_slot(cfg: QuickstartConfig) -> tuple[float, int]:
    """(minutes, threads) of each architecture's training: side by side, the whole training time on a share of
    the threads; otherwise one after the other, a share of the time on every thread."""
    threads = side_by_side_threads()
    if threads:
        return cfg.train_minutes, threads
    return cfg.train_minutes / len(ARCHS), torch.get_num_threads()


def train_all(cfg: QuickstartConfig, data_dir: Path, out: Path, echo) -> dict[str, dict]:
    """Train every architecture on the same wall-clock budget -> {arch: facts}."""
    threads = side_by_side_threads()
    minutes = training_slot(cfg)[0]
    share = f"{cfg.pretrain_share:.0%} CLM pretraining, then " if cfg.pretrain_share else ""
    echo(f"== training {', '.join(ARCHS)}: {minutes:.1f} min each ({share}contrastive fine-tuning; "
         f"d_model {cfg.d_model}, {cfg.layers} layers, context {cfg.context})")
    if not threads:
        return {arch: train_model(arch, cfg, data_dir, out, echo, minutes) for arch in ARCHS}
    import multiprocessing

    logs = {arch: out / "logs" / f"{arch}.log" for arch in ARCHS}
    logs[ARCHS[0]].parent.mkdir(parents=True, exist_ok=True)
    echo(f"   side by side, {threads} thread(s) each; progress in {', '.join(map(str, logs.values()))}")
    facts: dict[str, dict] = {}
    with multiprocessing.get_context("spawn").Pool(len(ARCHS)) as pool:    # leaving it stops what still runs
        jobs = {arch: pool.apply_async(_train_logged, (arch, cfg, data_dir, out, minutes, threads, logs[arch]))
                for arch in ARCHS}
        last_news = time.monotonic()
        while len(facts) < len(jobs):
            time.sleep(0.5)
            if time.monotonic() - last_news > NEWS_EVERY:
                last_news = time.monotonic()
                echo("   " + " | ".join(f"{arch} {_last_step_line(logs[arch])}" for arch in ARCHS if arch not in facts))
            for arch, job in jobs.items():
                if job.ready() and arch not in facts:
                    try:
                        facts[arch] = job.get()
                    except Exception as err:
                        raise MixretError(f"training {arch} failed (its log: {logs[arch]}): {err}") from err
                    echo(_trained_line(arch, facts[arch]))
        pool.close()
        pool.join()
    return {arch: facts[arch] for arch in ARCHS}


def _train_logged(arch: str, cfg: QuickstartConfig, data_dir: Path, out: Path, minutes: float, threads: int,
                  log: Path) -> dict:
    """train_model in a worker process on `threads` threads, its output written to `log`."""
    import contextlib
    torch.set_num_threads(threads)
    with open(log, "w", buffering=1, encoding="utf-8") as f, contextlib.redirect_stdout(f), \
            contextlib.redirect_stderr(f):
        return train_model(arch, cfg, data_dir, out, print, minutes)


def _last_step_line(log: Path) -> str:
    """The last progress line ("step 120/800: loss ...") of a training log, or "starting"."""
    try:
        lines = [line for line in log.read_text(encoding="utf-8", errors="replace").splitlines()
                 if line.startswith("step ")]
    except OSError:
        lines = []
    return lines[-1].split(", ")[0] if lines else "starting"


def _trained_line(arch: str, facts: dict) -> str:
    return (f"   {arch}: {facts['finetune_seconds']:.0f} s of fine-tuning ({facts['finetune_steps']} steps) -> "
            f"{facts['dir']}")


def _run(cfg: QuickstartConfig, echo: Callable[[str], None]) -> dict:

    t0 = time.perf_counter()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)

    # 1. data: the training pairs are all any model sees; the test pairs are only searched
    train, test, source = load_split(cfg)
    data_dir = out / "data"
    write_pairs_jsonl(train, data_dir / "train.jsonl.gz")
    write_pairs_jsonl(test, data_dir / "test.jsonl.gz")
    echo(f"== data: {len(train)} train pairs, {len(test)} test pairs ({source}) -> {data_dir}")
    train_tokenizer(train, data_dir, echo)

    # 2. training: the same wall-clock budget for each architecture
    report = {"config": dataclasses.asdict(cfg), "source": source, "n_train": len(train), "n_test": len(test),
              "n_matcher_train": min(cfg.matcher_pairs, len(train)), "models": {}}
    trained = train_all(cfg, data_dir, out, echo)
    for arch in ARCHS:
        facts = trained[arch]
        model_dir = Path(facts["dir"])
        model = load(model_dir)
        fusion = Fusion.from_dict(io.read_json(model_dir / FUSION_NAME), str(model_dir / FUSION_NAME))
        bm25 = load_bm25(model_dir)

        # 3. a matcher on the fine-tuned embeddings of the training pairs, each candidate slot also given its
        #    BM25 score and cosine, half of each set's negatives the query's nearest training documents
        mtrain = train[:cfg.matcher_pairs]
        echo(f"== {arch}: embedding {2 * (len(mtrain) + len(test))} texts, training the matcher")
        q = encode(model, [p.query for p in mtrain + test])
        t = encode(model, [p.target for p in mtrain + test])
        spec = model.spec
        mcfg = MatcherConfig(context=MATCHER_CONTEXT, d_model=cfg.matcher_d_model, n_layers=cfg.matcher_layers,
                             features=["bm25", "cosine"])
        matcher, mmetrics = matcher_on_pairs(mtrain, test, q, t, spec, model.trained_on, mcfg,
                                             out / "matchers" / arch, epochs=cfg.matcher_epochs, seed=cfg.seed,
                                             hard_negatives=(MATCHER_CONTEXT - 2) // 2, progress=False,
                                             overwrite=True)

        # 4. the test documents embedded and indexed: the corpus `mixret search` searches below
        emb_dir = out / "emb" / arch
        embed_corpus(model_dir, data_dir / "test.jsonl.gz", emb_dir, field="document", overwrite=True)
        emb, _, _, emb_meta = _load_emb(emb_dir)
        VectorIndex.build(emb, "Flat", meta={**spec.to_dict(), "model_path": str(model_dir.resolve())}).save(emb_dir)
        copy_to_emb_dir(emb_dir, emb_meta)

        # 5. every mode on the held-out pairs; tree on a sample of queries
        echo(f"== {arch}: evaluating vector, fusion, hybrid, tree ({min(cfg.tree_queries, len(test))} queries), "
             f"bm25, tfidf")
        rep = evaluate_pairs(test, model, matcher, modes=["vector", "fusion", "hybrid", "bm25", "tfidf"],
                             fusion=fusion, bm25_params=bm25)
        if "bm25_default" not in rep:       # the fit kept the defaults: the same BM25 twice
            rep["bm25_default"] = {**rep["modes"]["bm25"], "vs_bm25": {"wins": 0, "losses": 0, "p": 1.0}}
        tree = evaluate_pairs(test, model, matcher, modes=["tree", "bm25"], limit=cfg.tree_queries, bm25_params=bm25)
        rep["modes"]["tree"] = tree["modes"]["tree"]
        rep["tree_queries"] = tree["n_queries"]
        report["models"][arch] = {**facts, "params": model.num_params(), "pooling": spec.pooling,
                                  "docs_per_s": _docs_per_s(rep),
                                  "pool_head": model.pool_head is not None,
                                  "fusion": {"weight": fusion.weight, "method": fusion.method},
                                  "bm25": bm25.to_dict() if bm25 is not None else None,
                                  "matcher_dir": str(out / "matchers" / arch), "emb_dir": str(emb_dir),
                                  "matcher": _matcher_summary(mmetrics), "eval": rep}
    if cfg.baseline is not None:
        key, entry = run_baseline(cfg, data_dir, out, Path(trained[ARCHS[0]]["dir"]), test, echo)
        report["models"][key] = entry
    report["chance"] = rep["chance"]
    report["seconds"] = time.perf_counter() - t0
    report["machine"] = machine_description()
    io.write_json(out / "results.json", report)
    io.atomic_write_text(out / "results.md", format_report(report) + "\n")
    echo("")
    echo(format_report(report))
    echo(f"\n(results written to {out / 'results.md'} and {out / 'results.json'}; {report['seconds'] / 60:.1f} min)")
    return report


def baseline_key(name: str) -> str:
    """The baseline's name in the report: "st:" + the model's name (never an architecture's)."""
    return "st:" + Path(name.rstrip("/")).name


def run_baseline(cfg: QuickstartConfig, data_dir: Path, out: Path, fitted_dir: Path, test: list,
                 echo) -> tuple[str, dict]:
    """Fine-tune the baseline on the training pairs with the minutes and threads each mixret model had, fit its
    fusion weight on their validation slice with their fitted BM25 (read from `fitted_dir`, a fine-tuned mixret
    model), and evaluate vector and fusion like theirs -> (its key, its report entry)."""

    minutes, threads = training_slot(cfg)
    echo(f"== baseline {cfg.baseline}: {minutes:.1f} min of MultipleNegativesRankingLoss fine-tuning on "
         f"{threads} thread(s), as each mixret model had")
    bm25 = load_bm25(fitted_dir)
    facts = train_baseline(BaselineConfig(model=cfg.baseline, pairs=str(data_dir / "train.jsonl.gz"),
                                          out=str(out / "runs" / "baseline"), minutes=minutes, threads=threads,
                                          batch_size=cfg.batch_size, query_field="summary", target_field="document",
                                          seed=cfg.seed), bm25, echo)
    fusion = facts.pop("fusion_object")
    encoder = STEncoder.load(facts["dir"])
    echo(f"== baseline: evaluating vector, fusion, bm25 on {len(test)} test pairs")
    rep = evaluate_pairs(test, encoder, None, modes=["vector", "fusion", "bm25"], fusion=fusion, bm25_params=bm25)
    if "bm25_default" not in rep:
        rep["bm25_default"] = {**rep["modes"]["bm25"], "vs_bm25": {"wins": 0, "losses": 0, "p": 1.0}}
    return baseline_key(cfg.baseline), {
        **facts, "params": encoder.num_params(), "pooling": "sentence-transformers", "pool_head": False,
        "docs_per_s": _docs_per_s(rep), "fusion": {"weight": fusion.weight, "method": fusion.method},
        "bm25": bm25.to_dict() if bm25 is not None else None, "matcher": None, "eval": rep}


def _docs_per_s(rep: dict) -> float | None:
    """Embedding throughput of an evaluation: its corpus's documents per second."""
    seconds = rep.get("corpus_embed_seconds")
    return rep["corpus_size"] / seconds if seconds else None


def example_search(report: dict, cfg: QuickstartConfig) -> list[str]:
    """Arguments of one `mixret search` call on the masked mixer's index: fusion mode, the first test query."""
    out = Path(cfg.out)
    query = load_pairs(out / "data" / "test.jsonl.gz")[0].query
    return ["search", query, "--index", str(out / "emb" / ARCHS[0]), "--model", report["models"][ARCHS[0]]["dir"],
            "--mode", "fusion", "-k", "5"]


def _load_emb(emb_dir: Path):
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


def _table_row(model: str, mode: str, r: dict, cols: tuple[str, ...]) -> str:
    """One row of the comparison table: a mode's metrics, speed, matcher passes and won/lost against BM25."""
    passes = f"{r['passes_per_query']:.1f}" if r.get("passes_per_query") is not None else "-"
    qps = f"{r['queries_per_s']:.1f}" if r.get("queries_per_s") else "-"
    versus = format_paired(r["vs_bm25"]) if r.get("vs_bm25") else "-"
    return f"| {model} | {mode} | " + " | ".join(f"{r[c]:.3f}" for c in cols) + f" | {qps} | {passes} | {versus} |"


def _bm25_values(params: dict | None) -> str:
    """"k1 0.9, b 0.5, stemmer on" of a model's fitted BM25 record (the defaults without one)."""
    p = BM25Params.from_dict(params) if params is not None else BM25Params()
    return f"k1 {p.k1:g}, b {p.b:g}, stemmer {'on' if p.stemmer else 'off'}"


def format_report(report: dict) -> str:
    """The comparison table (markdown) and the models' side table."""
    cols = ("R@1", "R@10", "MRR@10", "nDCG@10")
    cfg = report["config"]
    any_eval = next(iter(report["models"].values()))["eval"]
    baseline = next((key for key in report["models"] if key not in ARCHS), None)
    share = f"{cfg['pretrain_share']:.0%} CLM pretraining then " if cfg["pretrain_share"] else ""
    lines = [f"Retrieval of {any_eval['n_queries']} held-out queries among their {any_eval['corpus_size']} "
             f"documents ({report['source']}; tree: first {any_eval.get('tree_queries')} queries, compared with BM25 "
             f"on those). BM25 fitted: k1, b and the stemmer fitted on the validation pairs by fine-tuning; defaults: "
             f"k1 1.5, b 0.75, stemmer on. tfidf: scikit-learn's TF-IDF (sublinear tf, English stop words, stemmed), "
             f"ranked by cosine, nothing fitted. Won/lost: queries a mode ranks first that the fitted BM25 does not, "
             f"and the reverse; p: exact McNemar test. Each model: "
             f"{next(iter(report['models'].values()))['train_minutes']:.1f} min of training ({share}contrastive "
             f"fine-tuning) on {report['n_train']} training pairs; matchers trained on {report['n_matcher_train']} "
             f"of them; machine: {report['machine']}."
             + (f" Baseline {baseline}: a pretrained sentence-transformers model fine-tuned with "
                f"MultipleNegativesRankingLoss on the same training pairs for the same minutes on the same threads as "
                f"each mixret model (after them), its fusion weight fitted on the same validation slice with the same "
                f"fitted BM25; it has no matcher." if baseline else "")
             + " Documents embedded/s: the test corpus embedded by each model on the same threads.", "",
             "| model | mode | " + " | ".join(cols) + " | queries/s | matcher passes/query | "
             "top-1 vs fitted bm25: won/lost (p) |",
             "|---|---|" + "---:|" * (len(cols) + 3)]
    for arch, m in report["models"].items():
        for mode in ("vector", "fusion", "hybrid", "tree"):
            if mode in m["eval"]["modes"]:          # a baseline has no matcher: vector and fusion only
                lines.append(_table_row(arch, mode, m["eval"]["modes"][mode], cols))
    fitted = {arch: _bm25_values(m.get("bm25")) for arch, m in report["models"].items()}
    shown = set()
    for arch, m in report["models"].items():      # one fitted BM25 and the defaults beside it, per distinct fit
        if fitted[arch] in shown:
            continue
        shown.add(fitted[arch])
        who = "-" if len(set(fitted.values())) == 1 else arch
        lines.append(_table_row(who, f"bm25, fitted ({fitted[arch]})", m["eval"]["modes"]["bm25"], cols))
        lines.append(_table_row(who, "bm25, defaults", m["eval"]["bm25_default"], cols))
        if "tfidf" in m["eval"]["modes"]:           # the same TF-IDF for every model; won/lost against this fit
            lines.append(_table_row(who, "tfidf", m["eval"]["modes"]["tfidf"], cols))
    ch = report["chance"]
    lines.append("| - | chance | " + " | ".join(f"{ch[c]:.3f}" if c in ch else "-" for c in cols) + " | - | - | - |")
    lines += ["", "Models:", "",
              "| model | parameters | pooling | pretrain steps (s) | fine-tune steps (s) | validation R@1 | "
              "fusion weight | matcher top-1 of 31 (chance) | documents embedded/s |",
              "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for arch, m in report["models"].items():
        mm = m["matcher"] or {}
        pre = f"{m['pretrain_steps']} ({m['pretrain_seconds']:.0f})" if m.get("pretrain_steps") else "-"
        top1 = f"{mm['test_top1']:.3f} ({1 / 31:.3f})" if mm.get("test_top1") is not None else "-"
        rate = f"{m['docs_per_s']:.0f}" if m.get("docs_per_s") else "-"
        val = f"{m['val_r1']:.3f}" if m.get("val_r1") is not None else "-"
        pooling = m["pooling"] + (" (head)" if m.get("pool_head") else "")
        lines.append(f"| {arch} | {m['params']:,} | {pooling} | {pre} | {m['finetune_steps']} "
                     f"({m['finetune_seconds']:.0f}) | {val} | {m['fusion']['weight']:.2f} ({m['fusion']['method']}) "
                     f"| {top1} | {rate} |")
    return "\n".join(lines)
