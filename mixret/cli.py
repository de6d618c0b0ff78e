"""The `mixret` command line: a thin click layer over the Python API."""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import typing
from pathlib import Path

import click

from mixret import io
from mixret.errors import MixretError
from mixret.models.config import ModelConfig
from mixret.models.generate import SAMPLING, Sampling, generate_text
from mixret.models.zoo import load, model_table
from mixret.options import all_options, flat_options, option_fields, read_options_file, replace_options
from mixret.quickstart import QuickstartConfig, example_search, run
from mixret.retrieval.embeddings import (
    EmbedConfig,
    default_model_dir,
    default_out_dir,
    embed_corpus,
)
from mixret.retrieval.evaluate import (
    EvaluateConfig,
    evaluate,
    format_table,
)
from mixret.retrieval.indexing import IndexConfig, build_index
from mixret.retrieval.search import MODES, RetrievalConfig, format_hits, load_corpus
from mixret.serve import read_token, serve
from mixret.training.finetune import FinetuneConfig, finetune, finetune_config
from mixret.training.loop import Interrupted
from mixret.training.matcher import TrainMatcherConfig, format_summary, run_train_matcher
from mixret.training.pretrain import TrainConfig, pretrain, resolve_options


def friendly(fn):
    """Turn MixretError into a clean one-line error and exit status 1."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except MixretError as e:
            raise click.ClickException(str(e)) from None
    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mixret")
def main():
    """mixret: retrieval embeddings from masked mixers.

    Pretrain a causal masked mixer (or a transformer baseline), embed a corpus with it,
    train a matcher on (summary, document) pairs, then index, search and evaluate.
    """


class Warnings:
    """Collect Python warnings (IVF shrinking, query truncation, ...) and print each as `warning: ...`."""

    def __enter__(self):
        import warnings
        self._ctx = warnings.catch_warnings(record=True)
        self._caught = self._ctx.__enter__()
        warnings.simplefilter("always")
        return self

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)
        for w in self._caught:
            if issubclass(w.category, UserWarning):
                click.echo(f"warning: {w.message}", err=True)
        return False


def report_interrupted(e, command: str) -> None:
    """Tell how to continue a run stopped by SIGINT/SIGTERM (under torchrun, rank 0 reports); exit 128+signal."""
    import os
    import sys

    if os.environ.get("RANK", "0") == "0":
        continue_with = f"\ncontinue with: {command} --out {e.checkpoint.parent.parent} --resume" \
            if e.checkpoint is not None else ""
        click.echo(f"{e}{continue_with}", err=True)
    sys.exit(128 + e.signum)


# --- options from the config dataclasses ------------------------------------------------------

def _shown(value) -> str | None:
    if value is None or value == [] or value == ():
        return None
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value)
    return str(value)


def _value_type(kind):
    """The click type of a field's annotation: int | None -> int, list[str] -> str."""
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    if typing.get_origin(kind) in (list, tuple):
        return args[0] if args else str
    if args and typing.get_origin(kind) is not None:
        return _value_type(args[0])
    return kind


def field_option(name: str, f: dataclasses.Field, default, kind, flag: str | None = None, show: str | None = None):
    """The click option of one config field: None unless given (so that a --config file or a resumed run's saved
    options apply under the flags given); its help is the field's, with the default it then takes."""
    flag = "--" + (flag or name).replace("_", "-")
    meta = {**f.metadata, **({"show": show} if show else {})}
    shown = meta.get("show") or _shown(default)
    if kind is bool or _value_type(kind) is bool:
        switch = meta.get("switch") or f"{flag}/--no-{flag[2:]}"
        on, _, off = switch.partition("/")
        names, extra = [switch], ({"is_flag": True} if not off else {})
        shown = meta.get("show") or (on if default else (off or None))
    else:
        names, extra = [flag], {"type": click.Choice(meta["choices"]) if meta.get("choices") else _value_type(kind)}
        if typing.get_origin(kind) is list or list in [typing.get_origin(a) for a in typing.get_args(kind)]:
            extra["multiple"] = True
    if meta.get("split"):
        sep = meta["split"]
        names, extra = [flag], {"callback": lambda ctx, param, v: None if v is None else
                                [x for x in v.split(sep) if x and x != "none"]}
        shown = meta.get("show") or (sep.join(default) if default else "none")
    text = meta["help"] + (f"  [default: {shown}]" if shown is not None else "")
    return click.option(*names, name, default=None, help=text, **extra)


def config_options(cls, defaults=None, exclude: tuple[str, ...] = (), rename: dict | None = None):
    """Decorator: a click option for each option of the config class `cls` and of its nested configs (a model, a
    loop), with the defaults of the instance `defaults` (cls() when None): the config is the one place each default
    and help text is declared. The command receives them by option name, None when not given."""
    def decorate(fn):
        base = defaults if defaults is not None else cls()
        values = flat_options(base)
        holders = {f.name: f for f in dataclasses.fields(cls)}
        for name, (holder, f) in reversed(list(all_options(cls).items())):
            if name in exclude or not f.metadata.get("cli", True):
                continue
            owner = type(getattr(base, holder)) if holder else cls
            shown = holders[holder].metadata["show"].get(name) if holder else None
            fn = field_option(name, f, values[name], typing.get_type_hints(owner)[f.name],
                              flag=(rename or {}).get(name, name), show=shown)(fn)
        return fn
    return decorate


def given_options(options: dict) -> dict:
    """The options given on the command line (not None), multiple ones as lists."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in options.items() if v is not None and v != ()}


# --- models ----------------------------------------------------------------------------------

@main.command("models")
@config_options(ModelConfig, exclude=tuple(n for n in option_fields(ModelConfig) if n not in ("d_model", "layers",
                                                                                              "context")))
@click.option("--vocab-size", type=int, default=None,
              help=f"Vocabulary size.  [default: {ModelConfig().vocab_size}]")
@friendly
def models_cmd(vocab_size, **options):
    """List the registered architectures with their parameter counts for one config."""
    cfg = replace_options(ModelConfig(), given_options(options))
    if vocab_size is not None:
        cfg = dataclasses.replace(cfg, vocab_size=vocab_size)
    click.echo(model_table(d_model=cfg.d_model, n_layers=cfg.n_layers, context=cfg.context, vocab_size=cfg.vocab_size))


# --- pretrain --------------------------------------------------------------------------------

CONFIG_FILE = click.option("--config", "config_file", type=click.Path(dir_okay=False),
                           help="JSON file of options (names as the flags, e.g. {\"d_model\": 256}); flags override "
                                "it.")


@main.command("pretrain")
@config_options(TrainConfig)
@CONFIG_FILE
@friendly
def pretrain_cmd(config_file, **options):
    """Pretrain a causal language model on texts and save it with its tokenizer: next-token prediction
    (--objective clm, the default), or spans of each document as queries against the batch's documents
    (--objective spans: a retriever from documents without pairs, or a start for finetune --model).

    With no options: a small masked mixer on the bundled corpus, a few minutes on a CPU. Runs unchanged
    under torchrun (DistributedDataParallel). Ctrl-C or SIGTERM writes a checkpoint before stopping;
    --resume continues from the newest one.
    """
    _run_text_task(given_options(options), config_file, "mixret pretrain")


@main.command("distill")
@config_options(TrainConfig, TrainConfig(objective="distill"),
                exclude=("objective", "pack", "label_smoothing", "span_min", "span_max", "arch", "init"),
                rename={"data": "texts", "text_field": "field", "distill_loss": "loss"})
@click.option("--model", "student", default=None, help="The student: an architecture (a new model of the size the "
              "model options give) or a mixret model folder to start from (its size and tokenizer; a language model "
              "gets the embedding head, as in finetune).  [default: masked-mixer]")
@CONFIG_FILE
@friendly
def distill_cmd(config_file, student, **options):
    """Distil a sentence-transformers teacher into a mixret model: the student learns to reproduce the teacher's
    embedding of each text (no pairs needed), optionally with in-batch InfoNCE on --pairs.

    The third objective of pretrain (pretrain's corpus, tokenizer, batches, budget, resume and torchrun):
    validation reports the held-out texts' mean cosine with the teacher (val_cos) and how often the student's own
    nearest neighbour among them is the teacher's (val_nn_agree). The output is an ordinary model folder that
    records its pooling and what it was trained on, for embed, index, search, evaluate, serve and finetune.
    Ctrl-C or SIGTERM writes a checkpoint before stopping; --resume continues from the newest one.

    \b
    Example:
      mixret distill --teacher sentence-transformers/all-MiniLM-L6-v2 --texts pairs.jsonl \\
          --field summary --field document --model masked-mixer --d-model 256 --layers 4 \\
          --budget-minutes 30 --out runs/mm-distilled
    """
    given = given_options(options)
    given["objective"] = "distill"
    if student is not None:
        given["init" if (Path(student) / io.CONFIG_NAME).is_file() else "arch"] = student
    _run_text_task(given, config_file, "mixret distill")


def _run_text_task(given: dict, config_file, command: str) -> None:
    """Resolve the options of a text-only run (given flags over --config over a resumed run's), train, report."""
    import os


    cfg = resolve_options(given, config_file)
    try:
        path = pretrain(cfg)
    except Interrupted as e:
        report_interrupted(e, command)
    if os.environ.get("RANK", "0") != "0":  # under torchrun, one process reports
        return
    if path.parent.name == "checkpoints":
        click.echo(f"checkpoint written to {path}\ncontinue with: {command} --out {path.parent.parent} --resume")
    else:
        click.echo(f"model written to {path}")


# --- finetune --------------------------------------------------------------------------------

@main.command("finetune")
@config_options(FinetuneConfig)
@CONFIG_FILE
@friendly
def finetune_cmd(config_file, **options):
    """Fine-tune a language model as a bi-encoder on (query, document) pairs: InfoNCE with in-batch negatives.

    The output folder is a model like pretrain's, whose config records the pooling (embed, search and evaluate
    use it), with fusion.json: the weight of `--mode fusion`, and bm25.json: BM25's k1, b and stemmer (a small
    grid, best validation R@1), both fitted on validation pairs; `mixret index` carries bm25.json to the index.
    Validation R@1 and MRR@10 are printed at each evaluation and written to metrics.jsonl. Ctrl-C or SIGTERM
    writes a checkpoint before stopping; --resume continues from it with the run's saved options.
    """
    cfg = finetune_config(given_options(options), config_file)
    with Warnings():
        try:
            path = finetune(cfg)
        except Interrupted as e:
            report_interrupted(e, "mixret finetune")
    if os.environ.get("RANK", "0") != "0":
        return
    if path.parent.name == "checkpoints":
        click.echo(f"checkpoint written to {path}\ncontinue with: mixret finetune --out {path.parent.parent} --resume")
    else:
        click.echo(f"model written to {path}")


# --- generate --------------------------------------------------------------------------------

@main.command("generate")
@click.argument("prompt", default="")
@click.option("--model", "model_dir", required=True, type=click.Path(file_okay=False),
              help="Model directory (config.json, model.safetensors, tokenizer.json).")
@config_options(Sampling)
@click.option("--seed", type=int, default=None, help="Random seed, for reproducible samples.")
@click.option("--greedy", is_flag=True, help="Always take the most likely token (same as --temperature 0).")
@friendly
def generate_cmd(prompt, model_dir, seed, greedy, **options):
    """Continue PROMPT with a pretrained language model and print the text.

    Stops at the end-of-text token, after --max-new-tokens, or when the model's context is full.
    """
    model = load(model_dir)
    if model.tokenizer is None:
        raise MixretError(f"{model_dir}: no tokenizer.json; generate needs the tokenizer saved with the model")
    sampling = replace_options(SAMPLING, {**given_options(options), **({"temperature": 0.0} if greedy else {})})
    text, out = generate_text(model, prompt, seed=seed, **dataclasses.asdict(sampling))
    click.echo(text)
    if out.context_full:
        click.echo(f"[stopped: the model's context of {model.config.context} tokens is full]", err=True)


# --- embed -----------------------------------------------------------------------------------

@main.command("embed")
@click.argument("corpus")
@click.option("--model", "model_dir", type=click.Path(file_okay=False), default=None,
              help="Model folder (default: the newest model under ./runs).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Output EMB_DIR (default: emb/MODEL/CORPUS-FIELD).")
@config_options(EmbedConfig)
@friendly
def embed_cmd(corpus, model_dir, out_dir, **options):
    """Embed CORPUS (.jsonl, .jsonl.gz, .parquet, .txt or a Hugging Face dataset name) into an EMB_DIR:
    embeddings.safetensors [N, D], ids.jsonl and meta.json. Run under torchrun to split the corpus
    across processes."""
    given = given_options(options)
    model_dir = model_dir or default_model_dir()
    out_dir = out_dir or default_out_dir(model_dir, corpus, given.get("field", EmbedConfig.field))
    with Warnings():
        meta = embed_corpus(model_dir, corpus, out_dir, **given)
    if meta:  # torchrun: rank 0 reports
        click.echo(f"{out_dir}: {meta['count']} embeddings of dim {meta['dim']} ({meta['arch']}, pooling "
                   f"{meta['pooling']}, max_length {meta['max_length']}); {meta['truncated']} truncated, "
                   f"{meta['skipped_empty']} empty skipped")


# --- train-matcher ---------------------------------------------------------------------------

def _deprecated_hard_negatives(ctx, param, value):
    if value is not None:
        click.echo("warning: --hard-negatives is now --hard-candidates (the old name will go)", err=True)
    return value


@main.command("train-matcher")
@config_options(TrainMatcherConfig)
@click.option("--hard-negatives", type=int, default=None, hidden=True, callback=_deprecated_hard_negatives,
              help="Deprecated name of --hard-candidates.")
@CONFIG_FILE
@friendly
def train_matcher_cmd(hard_negatives, config_file, **options):
    """Train a matcher that picks each query's target among context-1 candidates, on the embeddings of
    (query, target) pairs. Pairs repeating an earlier query are dropped (the count is printed); the
    held-out split is scored on fixed candidate sets (full, and partly padded) against chance and cosine
    similarity: in-set scores, not corpus retrieval. Ctrl-C or SIGTERM writes a checkpoint before
    stopping; --resume continues from the newest one."""
    given = {**(read_options_file(config_file) if config_file else {}), **given_options(options)}
    if hard_negatives is not None:
        given.setdefault("hard_candidates", hard_negatives)
    cfg = replace_options(TrainMatcherConfig(), given, str(config_file or "options"))
    with Warnings():
        try:
            out, metrics = run_train_matcher(cfg, say=lambda m: click.echo(m, err=True))
        except Interrupted as e:
            report_interrupted(e, "mixret train-matcher (the same options)")
    if "checkpoint" in metrics:
        click.echo(f"checkpoint written to {metrics['checkpoint']}\ncontinue with the same command and --resume")
        return
    click.echo(format_summary(metrics))
    click.echo(f"matcher written to {out}")


# --- index / search / evaluate ---------------------------------------------------------------

@main.command("index")
@click.argument("emb_dir", type=click.Path(file_okay=False))
@config_options(IndexConfig)
@friendly
def index_cmd(emb_dir, **options):
    """Build a FAISS index over the embeddings in EMB_DIR (from `mixret embed`) and save it there
    as index.faiss + index.json. IVF and PQ indexes are trained on the embeddings themselves; an IVF
    with more lists than the corpus can train is shrunk, with a warning. The BM25 parameters fitted with
    the model (its bm25.json, from `mixret finetune`) are copied there too: search, fusion and serve use
    them, and bm25 search needs no model; a model without them leaves BM25 at its defaults.

    \b
    With --add and/or --delete, EMB_DIR is updated instead: only the new texts are embedded, with the model,
    pooling and max length EMB_DIR records, and the folder moves to its next version in one step (a crash at
    any point leaves the old corpus or the new one, never a mix). A Flat index is built again and equals a
    rebuild. An IVF, HNSW or PQ index keeps its training: new vectors join it, deleted and replaced ones stay in
    it, hidden. Rebuild it (`mixret index EMB_DIR --factory ...`) when the removed vectors add up to a good
    share of the index (`removed` in the report: each search reads past them) or the corpus grew or changed
    by more than about a tenth (the IVF centroids and the HNSW graph were fitted to the old one)."""
    cfg = replace_options(IndexConfig(), given_options(options))
    with Warnings():
        done = build_index(emb_dir, cfg)
    if cfg.add is not None or cfg.delete is not None:
        index = "no vector index" if done["index"] is None else f"{done['index']} index"
        hidden = f", {done['removed']} removed vectors still in it" if done["removed"] else ""
        click.echo(f"{emb_dir}: {done['added']} added, {done['replaced']} replaced, {done['deleted']} deleted; "
                   f"{done['count']} texts, version {done['version']}; {index}{hidden}")
        return
    index = done["index"]
    where = f" in the Milvus collection {index.collection} at {index.uri}" if cfg.backend == "milvus" else ""
    click.echo(f"{emb_dir}: {index.factory} index ({cfg.metric}) over {index.count} vectors of dim {index.dim}"
               f"{where}; BM25 {done['bm25'].describe()}")


AS_JSON = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")


@main.command("search")
@click.argument("query")
@click.option("--index", "emb_dir", required=True, type=click.Path(file_okay=False),
              help="EMB_DIR of the corpus (with an index from `mixret index` for vector and hybrid).")
@click.option("--mode", type=click.Choice(list(MODES)), default="vector",
              show_default=True, help="vector: FAISS; fusion: BM25 and the model's scores combined; tree: matcher "
                                      "tournament over the whole corpus; hybrid: shortlist ranked by the matcher; "
                                      "bm25: lexical baseline (English stopwords dropped), no model needed. BM25 "
                                      "uses the k1, b and stemmer `mixret index` copied into EMB_DIR from the "
                                      "fine-tuned model (bm25.json), else k1 1.5, b 0.75, words stemmed. tfidf: "
                                      "scikit-learn's TF-IDF (sublinear tf, English stop words, words stemmed), "
                                      "texts ranked by cosine with the query; no model needed.")
@click.option("-k", "k", default=10, show_default=True, help="Results to return.")
@config_options(RetrievalConfig)
@AS_JSON
@friendly
def search_cmd(query, emb_dir, mode, k, as_json, **options):
    """Search the corpus in EMB_DIR for QUERY and print rank, id, score and the start of each text
    (--json: one JSON object a line). The model defaults to the one that embedded the corpus."""
    import json


    r = replace_options(RetrievalConfig(), given_options(options))
    shortlist, shortlist_from = r.shortlist, r.shortlist_from
    if not query.strip():
        raise MixretError("empty query; expected some text to search for")
    with Warnings():
        corpus = load_corpus(emb_dir, [mode], r.model, r.matcher, r.fusion_weight, shortlist_from)
        try:
            query_emb = corpus.encode([query]) if corpus.model is not None else None
            result = corpus.retriever.search(mode, k, query_emb=query_emb, queries=[query], shortlist=shortlist,
                                             shortlist_from=shortlist_from)
        finally:
            corpus.close()
    ids, texts, matcher = corpus.ids, corpus.texts, corpus.retriever.matcher
    indices, scores = result.indices[0], result.scores[0]
    if as_json:
        for rank, (i, s) in enumerate(zip(indices, scores), 1):
            if i >= 0:
                click.echo(json.dumps({"rank": rank, "id": ids[i], "score": float(s), "text": texts[i]},
                                      ensure_ascii=False))
    else:
        click.echo(format_hits(ids, texts, indices, scores))
    if mode in ("tree", "hybrid"):
        click.echo(f"{mode}: {int(result.passes[0])} matcher forward passes "
                   f"(groups of {matcher.config.context - 1}) in {result.seconds:.3f} s", err=True)


@main.command("evaluate")
@config_options(EvaluateConfig)
@AS_JSON
@friendly
def evaluate_cmd(as_json, **options):
    """Search every held-out query of the pairs among all the held-out targets and report R@1, R@10,
    MRR@10 and nDCG@10 (ranx), queries/s and, for tree and hybrid, matcher passes per query.

    BM25 (bm25, fusion, a bm25 shortlist) scores with the k1, b and stemmer fitted with the model (its
    bm25.json from `mixret finetune`; with --mode bm25 the model is read for them only, not loaded), and
    with the defaults where the model has none or no --model is given; a line on stderr says which.

    Held out means: every pair of a file that trained none of the models used, the test split of a file
    that trained one (each model and matcher records its training data); the first line says which.
    Pairs repeating an earlier query are dropped, as train-matcher drops them. Ties count against the
    relevant document."""
    cfg = replace_options(EvaluateConfig(), given_options(options))
    with Warnings():
        report = evaluate(cfg, say=lambda line: click.echo(line, err=True))
    click.echo(json.dumps(report) if as_json else format_table(report))


@main.command("serve")
@click.option("--index", "emb_dir", required=True, type=click.Path(file_okay=False),
              help="EMB_DIR of the corpus, with an index from `mixret index`.")
@config_options(RetrievalConfig)
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind; 0.0.0.0 makes the server reachable from other machines.")
@click.option("--port", default=8000, show_default=True, help="Port to listen on (0: any free port).")
@click.option("--threads", type=int, default=None, help="torch and FAISS threads, set once at start "
              "(default: the number of CPU cores).")
@click.option("--max-batch", default=64, show_default=True, help="Most queries encoded together in one batch.")
@click.option("--max-wait-ms", default=2.0, show_default=True,
              help="How long a batch waits for more queries after its first one.")
@click.option("--token-file", type=click.Path(dir_okay=False), default=None,
              help="Turn writes on: POST /documents and DELETE /documents/ID then need 'Authorization: Bearer "
                   "TOKEN', TOKEN being this file's content (surrounding whitespace stripped). Default: the "
                   "MIXRET_TOKEN environment variable; with neither, writes answer 403.")
@friendly
def serve_cmd(emb_dir, host, port, threads, max_batch, max_wait_ms, token_file, **options):
    """Serve searches of the corpus in EMB_DIR over HTTP: POST /search (JSON), GET /health, GET / (a page
    comparing two modes side by side) and GET /docs. The model, index, BM25 and matcher are loaded once;
    concurrent queries are encoded in batches. Every mode of `mixret search` is served; tree and hybrid
    need --matcher.

    \b
    With a token (--token-file or MIXRET_TOKEN), the corpus takes writes: POST /documents
    {"documents": [{"id": "...", "text": "..."}, ...]} adds or replaces, DELETE /documents/ID removes, GET
    /documents/ID reads. A write is acknowledged once it is in EMB_DIR/writes.wal on the disk and searchable; a
    restart (after a crash too) replays the log and folds it into EMB_DIR, so every acknowledged write is kept
    and no half of an unacknowledged one. The server then holds EMB_DIR's write lock: one writer at a time."""
    r = replace_options(RetrievalConfig(), given_options(options))
    serve(emb_dir, r.model, r.matcher, host=host, port=port, threads=threads, max_batch=max_batch,
          max_wait_ms=max_wait_ms, echo=lambda line: click.echo(line, err=True), token=read_token(token_file),
          fusion_weight=r.fusion_weight, shortlist=r.shortlist, shortlist_from=r.shortlist_from)


# --- quickstart ------------------------------------------------------------------------------

@main.command("quickstart")
@config_options(QuickstartConfig)
@friendly
def quickstart_cmd(**options):
    """Run the whole pipeline: train a masked mixer and a llama baseline of the same size for the same wall-clock
    time (contrastive fine-tuning, after optional CLM pretraining), train a matcher for each, index, evaluate
    vector, fusion, hybrid, tree and BM25 on the held-out pairs, print one comparison table (also saved as
    OUT/results.md and OUT/results.json), then one example search. On the bundled corpus unless --pairs (and
    --test-pairs) name your own."""
    cfg = replace_options(QuickstartConfig(), given_options(options))
    report = run(cfg, echo=click.echo)
    args = example_search(report, cfg)
    click.echo("\n$ mixret " + " ".join(_shell_quote(a) for a in args))
    main.main(args=args, standalone_mode=False)


def _shell_quote(arg: str) -> str:
    import shlex
    return shlex.quote(arg)


# --- bench -----------------------------------------------------------------------------------

BENCHMARKS = ("train", "mixing", "hypermixer", "retrieval", "generate")


@main.command("bench", context_settings={"ignore_unknown_options": True})
@click.argument("name", type=click.Choice(BENCHMARKS))
@click.argument("script_args", nargs=-1, type=click.UNPROCESSED)
@friendly
def bench_cmd(name, script_args):
    """Run the benchmark scripts/bench_NAME.py of a source checkout; the arguments after NAME go to the
    script (e.g. `mixret bench train --quick`; `mixret bench train -- --help` lists them). Tables and
    plots go to docs/bench/ (see docs/benchmarks.md)."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "scripts" / f"bench_{name}.py"
    if not script.is_file():
        raise MixretError(f"{script}: benchmark script not found; the benchmarks run from a source checkout "
                          f"of mixret (an installed wheel has no scripts/ folder)")
    sys.exit(subprocess.call([sys.executable, str(script), *script_args]))


if __name__ == "__main__":
    main()
