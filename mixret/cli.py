"""The `mixret` command line: a thin click layer over the Python API."""
from __future__ import annotations

import functools
from pathlib import Path

import click


from mixret import io
from mixret.data import drop_repeated_queries, file_hash, load_pairs, sources_record, split_pairs
from mixret.errors import MixretError
from mixret.models.config import ARCHS, ModelConfig, model_options
from mixret.models.encode import EmbeddingSpec, resolve_spec
from mixret.models.generate import generate_text
from mixret.models.matcher import MatcherConfig
from mixret.models.zoo import model_table
from mixret.quickstart import QuickstartConfig, example_search, run
from mixret.retrieval.bm25 import BM25_NAME, copy_to_emb_dir, load_bm25, model_bm25
from mixret.retrieval.corpus import WriteLock, clear_log, load_snapshot, update_folder, write_version
from mixret.retrieval.embeddings import (
    default_model_dir,
    default_out_dir,
    embed_corpus,
    load_matcher_checked,
    load_model_checked,
    matcher_spec,
)
from mixret.retrieval.evaluate import (
    EVAL_MODES,
    MATCHER_MODES,
    evaluate_pairs,
    format_table,
    held_out_split,
    resolve_modes,
    uses_bm25,
)
from mixret.retrieval.fusion import load_fusion
from mixret.retrieval.index import VectorIndex
from mixret.retrieval.milvus import MilvusIndex, check_uri, default_collection
from mixret.retrieval.search import LEXICAL_MODES, MODES, format_hits, load_corpus
from mixret.serve import read_token, serve
from mixret.training.finetune import FinetuneConfig, finetune
from mixret.training.loop import Interrupted
from mixret.training.matcher import check_split_sizes, dedupe_queries, embed_pairs, format_summary, train_matcher
from mixret.training.pretrain import TrainConfig, pretrain, resolve_options
from mixret.models.zoo import load


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


# --- models ----------------------------------------------------------------------------------

@main.command("models")
@click.option("--d-model", default=256, show_default=True, help="Model width.")
@click.option("--layers", "n_layers", default=8, show_default=True, help="Number of blocks.")
@click.option("--context", default=512, show_default=True, help="Maximum input length.")
@click.option("--vocab-size", default=4096, show_default=True, help="Vocabulary size.")
@friendly
def models_cmd(d_model, n_layers, context, vocab_size):
    """List the registered architectures with their parameter counts for one config."""
    click.echo(model_table(d_model=d_model, n_layers=n_layers, context=context, vocab_size=vocab_size))


# --- pretrain --------------------------------------------------------------------------------

def _pretrain_opt(*names, **kw):
    """A pretrain option whose value is None unless given (so saved or --config values are not overridden);
    the help text shows the default that then applies."""
    default = kw.pop("show", None)
    if default is not None:
        kw["help"] = f"{kw['help']}  [default: {default}]"
    return click.option(*names, default=None, **kw)


def run_options(fn):
    """The options of a run that every trainer shares (mixret.training.loop): its length as a time budget, stopping
    early, resuming and replacing. None unless given, so saved or --config values are not overridden."""
    for option in reversed([
        click.option("--budget-minutes", type=float, default=None,
                     help="Schedule length: as many steps as fit this many minutes on this machine, evaluations "
                          "included (instead of --steps or --epochs; the resolved steps are saved with the run)."),
        click.option("--stop-after", type=int, default=None,
                     help="End this invocation after this many steps, with a checkpoint."),
        click.option("--resume", is_flag=True, default=None,
                     help="Continue the run in --out from its newest checkpoint."),
        click.option("--overwrite", is_flag=True, default=None, help="Replace the run in --out."),
    ]):
        fn = option(fn)
    return fn


def model_options_for(config_class, defaults=None, exclude: tuple[str, ...] = ()):
    """Decorator adding one pretrain option per field of `config_class` (a ModelConfig) but vocab_size, which
    the tokenizer sets; help texts come from the fields and defaults from `defaults` (pretraining's model):
    a field added to ModelConfig is an option here without another line."""
    import typing


    def decorate(fn):
        types = typing.get_type_hints(config_class)
        for name, f in reversed([item for item in model_options(config_class).items() if item[0] not in exclude]):
            flag, kind = "--" + name.replace("_", "-"), types[f.name]
            default = getattr(defaults, f.name, f.default)
            if kind is bool:
                fn = _pretrain_opt(f"{flag}/--no-{flag[2:]}", help=f.metadata["help"],
                                   show="yes" if default else "no")(fn)
            else:
                choice = click.Choice(f.metadata["choices"]) if f.metadata.get("choices") else kind
                fn = _pretrain_opt(flag, type=choice, help=f.metadata["help"], show=default)(fn)
        return fn
    return decorate


def _pretrain_model_options(fn):
    return model_options_for(ModelConfig, TrainConfig().model)(fn)


def _training_options(fn):
    """The options of a text-only training run shared by pretrain and distill: schedule, optimiser, seed, output and
    logging (None unless given, so saved or --config values are not overridden)."""
    for option in reversed([
        _pretrain_opt("--steps", type=int, help="Optimizer steps of the whole schedule (not of this invocation).",
                      show=800),
        _pretrain_opt("--epochs", type=float,
                      help="Schedule length in passes over the training split (instead of --steps)."),
        _pretrain_opt("--batch-size", type=int, help="Sequences per micro-batch on each process (spans, distill: 32).",
                      show=16),
        _pretrain_opt("--grad-accum", type=int, help="Micro-batches per optimizer step.", show=1),
        _pretrain_opt("--lr", type=float, help="Peak learning rate (AdamW; cosine decay to a tenth of it; spans, "
                      "distill: 0.001).", show=4e-3),
        _pretrain_opt("--warmup", type=int, help="Linear warmup steps.", show="5% of the steps"),
        _pretrain_opt("--weight-decay", type=float, help="AdamW weight decay, on the weights of Linear layers and "
                      "mixing matrices (not on biases, norms or embeddings).", show=0.1),
        _pretrain_opt("--grad-clip", type=float, help="Gradient norm clipping.", show=1.0),
        _pretrain_opt("--seed", type=int, help="Seed for initialisation, data order and the validation split.", show=0),
        _pretrain_opt("--out", help="Output directory.", show="runs/ARCH-DATE-TIME"),
        _pretrain_opt("--log-every", type=int, help="Steps between metrics.jsonl lines.", show=10),
        _pretrain_opt("--eval-every", type=int, help="Steps between validations.", show=200),
        _pretrain_opt("--checkpoint-every", type=int, help="Steps between checkpoints.", show=500),
        _pretrain_opt("--compile/--no-compile", help="Run the model through torch.compile.", show="no"),
        _pretrain_opt("--num-workers", type=int, help="Processes for tokenization.", show=0),
    ]):
        fn = option(fn)
    return fn


@main.command("pretrain")
@_pretrain_opt("--data", multiple=True, help="Corpus: .txt (one document a line, or separated by <|endoftext|>), "
               ".jsonl/.jsonl.gz, .parquet, a folder of these, or a Hugging Face dataset name. Repeat for several. "
               "Default: the training split of the bundled pairs (summaries and documents; the test split is left "
               "out for evaluation).")
@_pretrain_opt("--text-field", multiple=True, help="JSONL field / column holding the text; repeat to read several "
               "fields of each record as separate documents.", show="text")
@_pretrain_opt("--val-fraction", type=float, help="Fraction of documents held out for validation (drawn with the "
               "seed).", show=0.05)
@_pretrain_opt("--val-max-docs", type=int, help="Most documents held out for validation.", show=5000)
@_pretrain_opt("--pack/--no-pack", help="clm: concatenate documents into full-context rows instead of one document "
               "per sequence.", show="no-pack")
@_pretrain_opt("--tokenizer", help="bpe (trained on the training split), bpe-lower (the same, case folded), bytes, "
               "or the path of a tokenizer.json (spans: bpe-lower).", show="bpe")
@_pretrain_opt("--vocab-size", type=int, help="BPE vocabulary size.", show=4096)
@_pretrain_model_options
@_training_options
@_pretrain_opt("--label-smoothing", type=float, help="clm: label smoothing of the training loss.", show=0.0)
@_pretrain_opt("--objective", type=click.Choice(["clm", "spans"]), help="What the model learns from the texts. "
               "clm: next-token prediction (a language model). spans: a retriever from documents alone: a random "
               "span of each document is a query whose positive is its document and whose negatives are the "
               "batch's other documents (symmetric InfoNCE); unless given, --tokenizer bpe-lower, --batch-size 32, "
               "--lr 0.001 and --mixing-init mean. The model records its pooling, so embed, search, evaluate and "
               "finetune --model use it as it is.", show="clm")
@_pretrain_opt("--pooling", type=click.Choice(["last", "eos", "mean"]), help="spans: the embedding trained.",
               show="last")
@_pretrain_opt("--temperature", type=float, help="spans: temperature of the InfoNCE logits.", show=0.05)
@_pretrain_opt("--span-min", type=int, help="spans: fewest tokens of a span (at most half of its document).", show=8)
@_pretrain_opt("--span-max", type=int, help="spans: most tokens of a span.", show=24)
@run_options
@click.option("--config", "config_file", type=click.Path(dir_okay=False),
              help="JSON file of options (names as the flags, e.g. {\"d_model\": 256}); flags override it.")
@friendly
def pretrain_cmd(config_file, **options):
    """Pretrain a causal language model on texts and save it with its tokenizer: next-token prediction
    (--objective clm, the default), or spans of each document as queries against the batch's documents
    (--objective spans: a retriever from documents without pairs, or a start for finetune --model).

    With no options: a small masked mixer on the bundled corpus, a few minutes on a CPU. Runs unchanged
    under torchrun (DistributedDataParallel). Ctrl-C or SIGTERM writes a checkpoint before stopping;
    --resume continues from the newest one.
    """
    given = {k: (list(v) if isinstance(v, tuple) else v) for k, v in options.items()
             if v is not None and v != ()}
    _run_text_task(given, config_file, "mixret pretrain")



def _distill_model_options(fn):
    return model_options_for(ModelConfig, TrainConfig(objective="distill").model, exclude=("arch",))(fn)


@main.command("distill")
@_pretrain_opt("--teacher", help="The teacher: a sentence-transformers model name (Hugging Face hub) or folder. Its "
               "embeddings of the texts are computed once, before training (a --budget-minutes counts the student's "
               "training only), and cached under $MIXRET_CACHE/teacher by the teacher's identity (name or path and "
               "a hash of its weights) and a hash of the texts.  [required]")
@_pretrain_opt("--texts", "data", multiple=True, help="Texts the student learns from, in any form pretrain --data "
               "reads (.txt, .jsonl, .parquet, a folder, a dataset name); repeat for several. Default: the training "
               "split of the bundled pairs (summaries and documents).")
@_pretrain_opt("--field", "text_field", multiple=True, help="Field / column holding the texts; repeat to read "
               "several fields of each record as separate texts.", show="text")
@_pretrain_opt("--pairs", help="Optional pairs file: its training split (split_pairs' test split, a tenth by a hash "
               "of the id, is never read) adds in-batch InfoNCE to the distillation loss.")
@_pretrain_opt("--query-field", help="Pairs field with the queries.", show="summary")
@_pretrain_opt("--target-field", help="Pairs field with the documents.", show="document")
@click.option("--model", "student", default=None, help="The student: an architecture (a new model of the size the "
              "model options give) or a mixret model folder to start from (its size and tokenizer; a language model "
              "gets the embedding head, as in finetune).  [default: masked-mixer]")
@_pretrain_opt("--loss", "distill_loss", type=click.Choice(["cosine", "mse"]), help="Distance to the teacher's "
               "embedding, through a learned isometry between the two widths (it keeps angles, so the student's "
               "own embedding, the one saved, has the geometry the loss trained).", show="cosine")
@_pretrain_opt("--pooling", type=click.Choice(["last", "eos", "mean"]), help="The student's embedding.", show="last")
@_pretrain_opt("--temperature", type=float, help="With --pairs: temperature of the InfoNCE logits.", show=0.05)
@_pretrain_opt("--val-fraction", type=float, help="Fraction of texts held out for validation (drawn with the seed).",
               show=0.05)
@_pretrain_opt("--val-max-docs", type=int, help="Most texts held out for validation.", show=5000)
@_pretrain_opt("--tokenizer", help="A new student: bpe-lower (trained on the training split, case folded), bpe, "
               "bytes, or the path of a tokenizer.json.", show="bpe-lower")
@_pretrain_opt("--vocab-size", type=int, help="BPE vocabulary size.", show=4096)
@_distill_model_options
@_training_options
@run_options
@click.option("--config", "config_file", type=click.Path(dir_okay=False),
              help="JSON file of options (names as in train_config.json); flags override it.")
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
    from pathlib import Path


    given = {k: (list(v) if isinstance(v, tuple) else v) for k, v in options.items()
             if v is not None and v != ()}
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

def _finetune_model_options(fn):
    return model_options_for(ModelConfig, FinetuneConfig().model, exclude=("arch",))(fn)


@main.command("finetune")
@click.option("--pairs", "pairs_path", type=click.Path(dir_okay=False), default=None,
              help="(query, document) pairs: .jsonl, .jsonl.gz, .parquet or TinyStoriesInstruct .txt. "
                   "Default: the bundled Debian pairs.")
@click.option("--query-field", default="summary", show_default=True, help="Pairs field with the queries.")
@click.option("--target-field", default="document", show_default=True, help="Pairs field with the documents.")
@click.option("--test-fraction", default=0.1, show_default=True,
              help="Share of pairs held out as the test split (by a hash of the id) and never trained on; 0 when "
                   "the test pairs are in another file.")
@click.option("--val-pairs", default=500, show_default=True,
              help="Training pairs kept aside for validation R@1 and for fitting the fusion weight and BM25's k1, b "
                   "and stemmer (at most a fifth of them).")
@click.option("--model", "init", default="masked-mixer", show_default=True,
              help="A model folder to fine-tune (from pretrain or finetune), or an architecture "
                   "(masked-mixer, hypermixer, llama) to start from random init with the model options below.")
@_finetune_model_options
@click.option("--pooling", type=click.Choice(["last", "mean", "eos"]), default="last", show_default=True,
              help="The embedding trained: last content token, mean of the text's tokens, or an appended eos; the "
                   "output model embeds with it by default.")
@click.option("--pool-head/--no-pool-head", default=True, show_default=True,
              help="last/eos pooling: embed through a trained head over the last layer that starts as the running "
                   "mean of the text's hidden states (what lets a pretrained language model, whose last position "
                   "predicts the next token, fine-tune without collapsing); off: the last layer's own state. A model "
                   "folder that already embeds (from finetune or pretrain --objective spans) keeps its own embedding.")
@click.option("--tokenizer", default="bpe-lower", show_default=True,
              help="Random init: bpe-lower (BPE trained on the training pairs, case folded, as retrieval wants), bpe "
                   "(case kept), bytes, or the path of a tokenizer.json.")
@click.option("--vocab-size", default=2048, show_default=True, help="Random init: BPE vocabulary size.")
@click.option("--max-length", type=int, default=None,
              help="Tokens per text, [bos] included; longer texts keep their start.  [default: the context]")
@click.option("--batch-size", default=32, show_default=True,
              help="Pairs per micro-batch: each query's in-batch negatives are the other documents of its batch.")
@click.option("--temperature", default=0.05, show_default=True, help="Softmax temperature of the InfoNCE loss.")
@click.option("--learn-temperature/--fixed-temperature", default=False, show_default=True,
              help="Train the temperature with the model.")
@click.option("--symmetric/--one-way", default=True, show_default=True,
              help="Also score each document against the batch's queries.")
@click.option("--hard-negatives", type=click.Choice(["none", "bm25"]), default="none", show_default=True,
              help="bm25: each query also brings the training document BM25 ranks highest for it.")
@click.option("--token-dropout", default=0.1, show_default=True,
              help="Fraction of each training text's tokens left out at each step: a new view of every pair in "
                   "every epoch.")
@click.option("--fusion-method", type=click.Choice(["convex", "rrf"]), default="convex", show_default=True,
              help="How fusion search combines BM25 and the model (its weight is fitted on the validation pairs).")
@click.option("--steps", type=int, default=None, help="Optimizer steps of the whole schedule.  [default: 500]")
@click.option("--lr", default=1e-3, show_default=True, help="Peak learning rate (AdamW; warmup, then cosine).")
@click.option("--weight-decay", default=0.01, show_default=True, help="AdamW weight decay on weight matrices.")
@click.option("--eval-every", default=100, show_default=True, help="Steps between validations.")
@click.option("--checkpoint-every", default=200, show_default=True, help="Steps between checkpoints.")
@click.option("--seed", default=0, show_default=True, help="Seed for initialisation and data order.")
@click.option("--out", default=None, help="Output folder.  [default: runs/MODEL-ft]")
@run_options
@friendly
def finetune_cmd(pairs_path, query_field, target_field, test_fraction, val_pairs, init, pooling, pool_head, tokenizer,
                 vocab_size,
                 max_length, batch_size, temperature, learn_temperature, symmetric, hard_negatives, token_dropout,
                 fusion_method, steps, lr, weight_decay, eval_every, checkpoint_every, seed, out, budget_minutes,
                 stop_after, resume, overwrite, **model_kw):
    """Fine-tune a language model as a bi-encoder on (query, document) pairs: InfoNCE with in-batch negatives.

    The output folder is a model like pretrain's, whose config records the pooling (embed, search and evaluate
    use it), with fusion.json: the weight of `--mode fusion`, and bm25.json: BM25's k1, b and stemmer (a small
    grid, best validation R@1), both fitted on validation pairs; `mixret index` carries bm25.json to the index.
    Validation R@1 and MRR@10 are printed at each evaluation and written to metrics.jsonl. Ctrl-C or SIGTERM
    writes a checkpoint before stopping; the same command with --resume continues from it.
    """
    import dataclasses
    import os


    given = {f.name: model_kw[name] for name, f in model_options().items() if model_kw.get(name) is not None}
    if init not in ARCHS and given:
        raise MixretError(f"model options ({', '.join(sorted(given))}) apply to a new model; {init} is a model "
                          f"folder: its own options stay")
    defaults = FinetuneConfig()
    model = dataclasses.replace(defaults.model, **given)
    if steps is None and budget_minutes is None:
        steps = 500
    loop_cfg = dataclasses.replace(defaults.loop, steps=steps, budget_minutes=budget_minutes, lr=lr,
                                   weight_decay=weight_decay, eval_every=eval_every,
                                   checkpoint_every=checkpoint_every, stop_after=stop_after)
    cfg = FinetuneConfig(pairs=pairs_path, query_field=query_field, target_field=target_field,
                         test_fraction=test_fraction, val_pairs=val_pairs, init=init, model=model, pooling=pooling,
                         pool_head=pool_head,
                         tokenizer=tokenizer, vocab_size=vocab_size, max_length=max_length, batch_size=batch_size,
                         temperature=temperature, learn_temperature=learn_temperature, symmetric=symmetric,
                         hard_negatives=hard_negatives, token_dropout=token_dropout, fusion_method=fusion_method,
                         seed=seed, loop=loop_cfg,
                         out=out, resume=bool(resume), overwrite=bool(overwrite))
    with Warnings():
        try:
            path = finetune(cfg)
        except Interrupted as e:
            report_interrupted(e, "mixret finetune (the same options)")
    if os.environ.get("RANK", "0") != "0":
        return
    if path.parent.name == "checkpoints":
        click.echo(f"checkpoint written to {path}\ncontinue with the same command and --resume")
    else:
        click.echo(f"model written to {path}")


# --- generate --------------------------------------------------------------------------------

@main.command("generate")
@click.argument("prompt", default="")
@click.option("--model", "model_dir", required=True, type=click.Path(file_okay=False),
              help="Model directory (config.json, model.safetensors, tokenizer.json).")
@click.option("--max-new-tokens", default=128, show_default=True, help="Most tokens to add.")
@click.option("--temperature", default=0.8, show_default=True, help="Sampling temperature; 0 = greedy.")
@click.option("--top-k", default=40, show_default=True, help="Sample from the k most likely tokens; 0 = off.")
@click.option("--top-p", default=0.9, show_default=True, help="Nucleus sampling mass; 1 = off.")
@click.option("--seed", type=int, default=None, help="Random seed, for reproducible samples.")
@click.option("--greedy", is_flag=True, help="Always take the most likely token (same as --temperature 0).")
@friendly
def generate_cmd(prompt, model_dir, max_new_tokens, temperature, top_k, top_p, seed, greedy):
    """Continue PROMPT with a pretrained language model and print the text.

    Stops at the end-of-text token, after --max-new-tokens, or when the model's context is full.
    """
    model = load(model_dir)
    if model.tokenizer is None:
        raise MixretError(f"{model_dir}: no tokenizer.json; generate needs the tokenizer saved with the model")
    text, out = generate_text(model, prompt, max_new_tokens=max_new_tokens, temperature=0.0 if greedy else temperature,
                              top_k=top_k, top_p=top_p, seed=seed)
    click.echo(text)
    if out.context_full:
        click.echo(f"[stopped: the model's context of {model.config.context} tokens is full]", err=True)


# --- embed -----------------------------------------------------------------------------------

@main.command("embed")
@click.argument("corpus")
@click.option("--model", "model_dir", type=click.Path(file_okay=False), default=None,
              help="Model folder (default: the newest model under ./runs).")
@click.option("--field", default="text", show_default=True,
              help="JSONL field / column with the texts (a pairs file such as the bundled one has summary and "
                   "document, no text); for a TinyStoriesInstruct .txt: summary or document.")
@click.option("--id-field", default="id", show_default=True,
              help="Field with the ids (line or row numbers when a record has none).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Output EMB_DIR (default: emb/MODEL/CORPUS-FIELD).")
@click.option("--batch-size", default=64, show_default=True, help="Texts per forward pass.")
@click.option("--dtype", type=click.Choice(["float32", "float16"]), default="float32", show_default=True,
              help="Stored embedding type.")
@click.option("--max-length", type=int, default=None,
              help="Tokens per text, bos included (default: the model's own, else its context).")
@click.option("--pooling", type=click.Choice(["last", "eos", "mean"]), default=None,
              help="last content token, an appended eos (for comparison), or mean over the content tokens "
                   "(default: the model's own, else last).")
@click.option("--device", default=None, help="torch device (default: the GPU if there is one).")
@click.option("--overwrite", is_flag=True, help="Replace an existing EMB_DIR once the new one is complete.")
@friendly
def embed_cmd(corpus, model_dir, field, id_field, out_dir, batch_size, dtype, max_length, pooling, device, overwrite):
    """Embed CORPUS (.jsonl, .jsonl.gz, .parquet, .txt or a Hugging Face dataset name) into an EMB_DIR:
    embeddings.safetensors [N, D], ids.jsonl and meta.json. Run under torchrun to split the corpus
    across processes."""

    model_dir = model_dir or default_model_dir()
    out_dir = out_dir or default_out_dir(model_dir, corpus, field)
    with Warnings():
        meta = embed_corpus(model_dir, corpus, out_dir, field=field, id_field=id_field, batch_size=batch_size,
                            dtype=dtype, max_length=max_length, pooling=pooling, overwrite=overwrite, device=device)
    if meta:  # torchrun: rank 0 reports
        click.echo(f"{out_dir}: {meta['count']} embeddings of dim {meta['dim']} ({meta['arch']}, pooling "
                   f"{meta['pooling']}, max_length {meta['max_length']}); {meta['truncated']} truncated, "
                   f"{meta['skipped_empty']} empty skipped")

# --- train-matcher ---------------------------------------------------------------------------

@main.command("train-matcher")
@click.option("--pairs", "pairs_path", required=True, type=click.Path(dir_okay=False),
              help="Pairs file: .jsonl, .jsonl.gz, .parquet or TinyStoriesInstruct .txt.")
@click.option("--model", "model_dir", type=click.Path(file_okay=False), default=None,
              help="Language model folder that embeds both sides (default: the newest model under ./runs).")
@click.option("--query-emb", type=click.Path(file_okay=False), default=None,
              help="EMB_DIR of the query texts (from `mixret embed`), used instead of --model; rows matched by id.")
@click.option("--target-emb", type=click.Path(file_okay=False), default=None,
              help="EMB_DIR of the target texts, used with --query-emb.")
@click.option("--query-field", default="summary", show_default=True, help="Pairs field with the queries.")
@click.option("--target-field", default="document", show_default=True, help="Pairs field with the targets.")
@click.option("--pooling", type=click.Choice(["last", "eos", "mean"]), default=None,
              help="How --model embeds the texts, as in `mixret embed` (default: the model's own, else last); "
                   "with --query-emb it must agree with theirs. Recorded in the matcher.")
@click.option("--context", default=32, show_default=True, help="Matcher slots: the query and context-1 candidates.")
@click.option("--epochs", default=10, show_default=True)
@click.option("--batch-size", default=256, show_default=True, help="Queries (candidate sets) per step.")
@click.option("--lr", default=1e-3, show_default=True, help="Peak learning rate (warmup, then cosine decay).")
@click.option("--d-model", default=256, show_default=True, help="Matcher width.")
@click.option("--layers", "n_layers", default=4, show_default=True, help="Mixer blocks.")
@click.option("--hard-negatives", default=0, show_default=True,
              help="Candidates per set drawn from the query's nearest training targets (by dense cosine and BM25).")
@click.option("--features", default="bm25,cosine", show_default=True,
              help="Per-candidate scores fed to each slot, comma-separated: bm25 (the candidate's BM25 score for "
                   "the query), cosine (of the embeddings); none for neither. Each is z-scored within its set "
                   "(docs/bench/matcher_features.md: with both, hybrid R@1 rose from 0.55 to 0.78).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Output folder (default: matchers/MODEL); an earlier matcher there is replaced once the new one "
                   "is complete.")
@click.option("--seed", default=0, show_default=True, help="Seed for initialisation, sampling and the test sets.")
@click.option("--test-fraction", default=0.1, show_default=True, help="Share of pairs held out, by a hash of the id.")
@run_options
@friendly
def train_matcher_cmd(pairs_path, model_dir, query_emb, target_emb, query_field, target_field, pooling, context,
                      epochs, batch_size, lr, d_model, n_layers, hard_negatives, features, out_dir, seed, test_fraction,
                      budget_minutes, stop_after, resume, overwrite):
    """Train a matcher that picks each query's target among context-1 candidates, on the embeddings of
    (query, target) pairs. Pairs repeating an earlier query are dropped (the count is printed); the
    held-out split is scored on fixed candidate sets (full, and partly padded) against chance and cosine
    similarity: in-set scores, not corpus retrieval. Ctrl-C or SIGTERM writes a checkpoint before
    stopping; --resume continues from the newest one."""
    from pathlib import Path


    if query_emb is None and target_emb is None and model_dir is None:
        model_dir = default_model_dir()
    if out_dir is None:
        name = Path(model_dir).resolve().name if model_dir else Path(query_emb or target_emb).resolve().parent.name
        out_dir = Path("matchers") / name
    with Warnings():
        pairs, n_repeated = drop_repeated_queries(load_pairs(pairs_path, query_field, target_field))
        if n_repeated:
            click.echo(f"{pairs_path}: dropped {n_repeated} pairs repeating an earlier query", err=True)
        train, test = split_pairs(pairs, test_fraction)
        click.echo(f"{len(train)} train pairs, {len(test)} test pairs", err=True)
        check_split_sizes(len(train), len(test), context)
        if (Path(out_dir) / io.CONFIG_NAME).is_file() and not overwrite:  # refuse another kind before embedding
            io.check_out_dir(out_dir, io.CONFIG_NAME, "matcher", overwrite=True)
        q, t, spec = embed_pairs(train + test, model_dir, query_emb, target_emb, pooling=pooling)
    splits, texts = {}, {}
    for name, part, rows in (("train", train, slice(0, len(train))), ("test", test, slice(len(train), None))):
        sq, st, keep = dedupe_queries(q[rows], t[rows])
        if len(keep) < len(q[rows]):
            click.echo(f"{name} split: dropped {len(q[rows]) - len(keep)} pairs whose query embedding repeats "
                       "an earlier one", err=True)
        splits[name] = (sq, st)
        texts[name] = ([part[i].query for i in keep], [part[i].target for i in keep])
    config = MatcherConfig(emb_dim=int(q.shape[1]), d_model=d_model, n_layers=n_layers, context=context,
                           embedder=spec.model_hash, pooling=spec.pooling, max_length=spec.max_length,
                           trained_on=sources_record([pairs_path], test_fraction),
                           features=[] if features == "none" else features.split(","))
    try:
        _, metrics = train_matcher(*splits["train"], *splits["test"], config, epochs=epochs, batch_size=batch_size,
                                   lr=lr, seed=seed, hard_negatives=hard_negatives, out_dir=out_dir,
                                   train_texts=texts["train"], test_texts=texts["test"],
                                   budget_minutes=budget_minutes, stop_after=stop_after, resume=bool(resume),
                                   overwrite=bool(overwrite))
    except Interrupted as e:
        report_interrupted(e, "mixret train-matcher (the same options)")
    if "checkpoint" in metrics:
        click.echo(f"checkpoint written to {metrics['checkpoint']}\ncontinue with the same command and --resume")
        return
    click.echo(format_summary(metrics))
    click.echo(f"matcher written to {out_dir}")


# --- index / search / evaluate ---------------------------------------------------------------

@main.command("index")
@click.argument("emb_dir", type=click.Path(file_okay=False))
@click.option("--factory", default="Flat", show_default=True,
              help="FAISS index factory string: Flat, HNSW32, IVF1024,Flat, IVF4096,PQ32, ... (a rebuild).")
@click.option("--metric", type=click.Choice(["ip", "l2"]), default="ip", show_default=True,
              help="ip: inner product of L2-normalised embeddings (cosine); l2: Euclidean distance.")
@click.option("--backend", type=click.Choice(["faiss", "milvus"]), default="faiss", show_default=True,
              help="Where the vectors go: faiss, an index file in EMB_DIR; milvus, a Milvus collection at --uri "
                   "(FLAT: exact search), for a corpus beyond one machine.")
@click.option("--uri", default=None, help="--backend milvus: a local Milvus Lite file ending in .db, or "
                                          "http://HOST:19530 for a Milvus server or cluster.")
@click.option("--collection", default=None, help="--backend milvus: the collection (replaced if it exists). "
                                                 "Default: mixret_ + EMB_DIR's folder name.")
@click.option("--add", "add_file", type=click.Path(dir_okay=False), default=None,
              help="Add the texts of this corpus file (any format `mixret embed` reads); a text whose id is in "
                   "EMB_DIR replaces it. Only these texts are embedded.")
@click.option("--delete", "delete_file", type=click.Path(dir_okay=False), default=None,
              help="Delete the ids listed in this file, one a line (applied before --add).")
@click.option("--field", default="text", show_default=True, help="--add: the field holding the texts.")
@click.option("--id-field", default="id", show_default=True, help="--add: the field holding the ids.")
@click.option("--model", "model_dir", type=click.Path(file_okay=False), default=None,
              help="--add: the model folder, if it moved (default: the one named in EMB_DIR/meta.json; other "
                   "weights are refused).")
@click.option("--batch-size", default=64, show_default=True, help="--add: texts per forward pass.")
@click.option("--device", default=None, help="--add: torch device (default: the GPU if there is one).")
@friendly
def index_cmd(emb_dir, factory, metric, backend, uri, collection, add_file, delete_file, field, id_field, model_dir,
              batch_size, device):
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
    if add_file is not None or delete_file is not None:
        return _update_index(emb_dir, add_file, delete_file, field, id_field, model_dir, batch_size, device)

    with Warnings(), WriteLock(emb_dir):
        snap, replayed = load_snapshot(emb_dir, with_index=False)
        meta = snap.meta
        record = {**EmbeddingSpec.of(meta).to_dict(), "model_path": meta.get("model_path")}
        if backend == "milvus":
            if factory != "Flat":
                raise MixretError(f"--backend milvus indexes FLAT (exact search); --factory {factory} is for faiss")
            index = MilvusIndex.build(snap.emb, check_uri(uri), collection or default_collection(emb_dir), metric,
                                      meta=record)
        elif uri is not None or collection is not None:
            raise MixretError("--uri and --collection go with --backend milvus")
        else:
            index = VectorIndex.build(snap.emb, factory, metric, meta=record)
        if snap.version == 0 and not replayed:
            index.save(emb_dir)
            if backend == "milvus":    # its record replaces a FAISS index
                for name in ("index.faiss", "index.rows.safetensors"):
                    (Path(emb_dir) / name).unlink(missing_ok=True)
        else:   # an updated folder: the new index is a new version
            from dataclasses import replace
            write_version(emb_dir, replace(snap, index=index), {"rebuilt": index.factory, "log_writes": replayed})
            if replayed:
                clear_log(emb_dir)
        bm25 = copy_to_emb_dir(emb_dir, meta)
        index.close()
    where = f" in the Milvus collection {index.collection} at {index.uri}" if backend == "milvus" else ""
    click.echo(f"{emb_dir}: {index.factory} index ({metric}) over {index.count} vectors of dim {index.dim}{where}; "
               f"BM25 {bm25.describe()}")


def _update_index(emb_dir, add_file, delete_file, field, id_field, model_dir, batch_size, device):
    with Warnings():
        done = update_folder(emb_dir, add_file, delete_file, field, id_field, model_dir, batch_size, device)
    index = "no vector index" if done["index"] is None else f"{done['index']} index"
    hidden = f", {done['removed']} removed vectors still in it" if done["removed"] else ""
    click.echo(f"{emb_dir}: {done['added']} added, {done['replaced']} replaced, {done['deleted']} deleted; "
               f"{done['count']} texts, version {done['version']}; {index}{hidden}")


def _retrieval_options(fn):
    """Options shared by search, serve and evaluate."""
    for option in reversed([
        click.option("--model", "model_dir", type=click.Path(file_okay=False), default=None,
                     help="Language model folder that embeds the texts (search, serve: default the model named "
                          "in EMB_DIR/meta.json; evaluate: the newest model under ./runs). evaluate also takes "
                          "BM25's fitted k1, b and stemmer from it (its bm25.json), with --mode bm25 too."),
        click.option("--matcher", "matcher_dir", type=click.Path(file_okay=False), default=None,
                     help="Matcher folder (from `mixret train-matcher`), for tree and hybrid."),
        click.option("--fusion-weight", type=click.FloatRange(0, 1), default=None,
                     help="fusion: weight of the model's score against BM25's (0: BM25's ranking, 1: the model's). "
                          "Default: the weight `mixret finetune` fitted and saved with the model (fusion.json)."),
        click.option("--shortlist", default=256, show_default=True,
                     help="hybrid: candidates the matcher's tournament ranks."),
        click.option("--shortlist-from", type=click.Choice(["vector", "bm25"]), default="vector",
                     show_default=True, help="hybrid: where the shortlist comes from."),
    ]):
        fn = option(fn)
    return fn


def _search_options(fn):
    """Options shared by search and evaluate."""
    as_json = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
    return _retrieval_options(as_json(fn))


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
@_search_options
@friendly
def search_cmd(query, emb_dir, mode, k, model_dir, matcher_dir, fusion_weight, shortlist, shortlist_from, as_json):
    """Search the corpus in EMB_DIR for QUERY and print rank, id, score and the start of each text
    (--json: one JSON object a line). The model defaults to the one that embedded the corpus."""
    import json


    if not query.strip():
        raise MixretError("empty query; expected some text to search for")
    with Warnings():
        corpus = load_corpus(emb_dir, [mode], model_dir, matcher_dir, fusion_weight, shortlist_from)
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
@click.option("--pairs", "pairs_path", required=True, type=click.Path(dir_okay=False),
              help="Pairs file: .jsonl, .jsonl.gz, .parquet or TinyStoriesInstruct .txt.")
@click.option("--mode", type=click.Choice(list(EVAL_MODES)), default="all",
              show_default=True, help="all: vector, bm25, tfidf, fusion when the model has a fusion weight (from "
                                      "`mixret finetune`) and, with --matcher, tree and hybrid. With bm25 among "
                                      "them, each other mode is compared with it query by query (top-1 won/lost "
                                      "and an exact McNemar p-value).")
@click.option("--limit", type=int, default=None, help="Evaluate the first Q queries (the corpus stays whole).")
@click.option("--query-field", default="summary", show_default=True, help="Pairs field with the queries.")
@click.option("--target-field", default="document", show_default=True, help="Pairs field with the targets.")
@click.option("--test-fraction", type=float, default=None,
              help="Score the hash test split of this fraction. Default: every pair of a file that trained "
                   "none of the models, the test split of one that did (as recorded in them).")
@click.option("--batch-size", default=64, show_default=True, help="Texts per embedding forward pass.")
@click.option("--pooling", type=click.Choice(["last", "eos", "mean"]), default=None,
              help="How texts are embedded, as in `mixret embed` (default: as the matcher's training pairs were, "
                   "else the model's own, else last); one that differs from the matcher's is refused.")
@click.option("--out", "out_path", type=click.Path(dir_okay=False), default=None, help="Write the report as JSON.")
@_search_options
@friendly
def evaluate_cmd(pairs_path, mode, limit, query_field, target_field, test_fraction, batch_size, pooling, out_path,
                 model_dir, matcher_dir, fusion_weight, shortlist, shortlist_from, as_json):
    """Search every held-out query of the pairs among all the held-out targets and report R@1, R@10,
    MRR@10 and nDCG@10 (ranx), queries/s and, for tree and hybrid, matcher passes per query.

    BM25 (bm25, fusion, a bm25 shortlist) scores with the k1, b and stemmer fitted with the model (its
    bm25.json from `mixret finetune`; with --mode bm25 the model is read for them only, not loaded), and
    with the defaults where the model has none or no --model is given; a line on stderr says which.

    Held out means: every pair of a file that trained none of the models used, the test split of a file
    that trained one (each model and matcher records its training data); the first line says which.
    Pairs repeating an earlier query are dropped, as train-matcher drops them. Ties count against the
    relevant document."""
    import json
    import warnings
    from pathlib import Path


    if mode not in LEXICAL_MODES and model_dir is None:
        model_dir = default_model_dir()
    fusion = load_fusion(model_dir, fusion_weight) if mode in ("fusion", "all") else None
    modes = resolve_modes(mode, matcher_dir is not None, fusion is not None)
    if mode == "all" and matcher_dir is None:
        click.echo("tree and hybrid skipped: they need --matcher", err=True)
    needs_model = any(m not in LEXICAL_MODES for m in modes)
    needs_matcher = any(m in MATCHER_MODES for m in modes)
    tuned = load_bm25(model_dir) if uses_bm25(modes, shortlist_from) else None
    unused = [flag for flag, given, used in (("--model", model_dir, needs_model or tuned is not None),
                                             ("--pooling", pooling, needs_model),
                                             ("--matcher", matcher_dir, needs_matcher)) if given and not used]
    if unused:
        click.echo(f"{', '.join(unused)} not used by mode {', '.join(modes)}", err=True)
    bm25_params = None
    if uses_bm25(modes, shortlist_from):
        bm25_params, bm25_note = model_bm25(model_dir)
        click.echo(bm25_note, err=True)
    model = matcher = spec = None
    trainers = {} if tuned is None else {f"the BM25 parameters {Path(model_dir) / BM25_NAME}": tuned.trained_on}
    with Warnings():
        if needs_matcher:
            matcher = load_matcher_checked(matcher_dir)
            trainers[f"matcher {matcher_dir}"] = matcher.config.trained_on
        if needs_model:
            spec = resolve_spec(model_dir, pooling, None,
                                [(matcher_spec(matcher), f"the matcher {matcher_dir}")] if matcher else [])
            model, _ = load_model_checked(model_dir)
            trainers[f"model {model_dir}"] = model.trained_on
        pairs, n_repeated = drop_repeated_queries(load_pairs(pairs_path, query_field, target_field))
        if n_repeated:
            click.echo(f"{pairs_path}: dropped {n_repeated} pairs repeating an earlier query", err=True)
        fraction, which, cautions = held_out_split(pairs_path, trainers, test_fraction)
        for caution in cautions:
            warnings.warn(caution, stacklevel=1)
        click.echo(f"scoring {which}", err=True)
        test = pairs if fraction is None else split_pairs(pairs, fraction)[1]
        if not test:
            raise MixretError(f"{pairs_path}: no pairs in the held-out split (test fraction {fraction}); "
                              f"expected at least one")
        report = evaluate_pairs(test, model, matcher, modes, shortlist=shortlist, shortlist_from=shortlist_from,
                                limit=limit, batch_size=batch_size, pooling=spec.pooling if spec else "last",
                                max_length=spec.max_length if spec else None, fusion=fusion,
                                bm25_params=bm25_params)
    report = {"pairs": str(pairs_path), "pairs_hash": file_hash(pairs_path), "scored": which,
              "test_fraction": fraction, "model": str(model_dir) if model is not None else None,
              "matcher": str(matcher_dir) if matcher is not None else None,
              "embeddings": spec.to_dict() if spec else None, **report,
              "repeated_queries_dropped": n_repeated + report["repeated_queries_dropped"]}
    click.echo(json.dumps(report) if as_json else format_table(report))
    if out_path is not None:
        io.write_json(out_path, report)


@main.command("serve")
@click.option("--index", "emb_dir", required=True, type=click.Path(file_okay=False),
              help="EMB_DIR of the corpus, with an index from `mixret index`.")
@_retrieval_options
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
def serve_cmd(emb_dir, model_dir, matcher_dir, host, port, threads, max_batch, max_wait_ms, token_file, **options):
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
    serve(emb_dir, model_dir, matcher_dir, host=host, port=port, threads=threads, max_batch=max_batch,
          max_wait_ms=max_wait_ms, echo=lambda line: click.echo(line, err=True), token=read_token(token_file),
          **options)


# --- quickstart ------------------------------------------------------------------------------

@main.command("quickstart")
@click.option("--out", default="quickstart-out", show_default=True, type=click.Path(file_okay=False),
              help="Folder for everything the run writes (models, matchers, embeddings, results).")
@click.option("--budget-minutes", default=14.0, show_default=True,
              help="Target wall-clock time of the whole run; 70 % of it trains the two models (side by side on a "
                   "CPU, each on half the threads; one after the other on a GPU).")
@click.option("--pairs", "pairs_path", type=click.Path(dir_okay=False), default=None,
              help="Your own training pairs (any pairs format mixret reads). Default: the bundled Debian pairs.")
@click.option("--test-pairs", "test_pairs_path", type=click.Path(dir_okay=False), default=None,
              help="Your own held-out pairs. Default: the test split of --pairs (by a hash of the id).")
@click.option("--query-field", default="summary", show_default=True, help="Pairs field with the queries.")
@click.option("--target-field", default="document", show_default=True, help="Pairs field with the documents.")
@click.option("--pretrain-share", default=0.0, show_default=True,
              help="Share of each model's training time spent on CLM pretraining before contrastive fine-tuning.")
@click.option("--d-model", default=256, show_default=True, help="Width of both language models.")
@click.option("--layers", default=4, show_default=True, help="Blocks of both language models.")
@click.option("--context", default=256, show_default=True, help="Context of both language models.")
@click.option("--batch-size", default=32, show_default=True, help="Fine-tuning pairs per step.")
@click.option("--hard-negatives", type=click.Choice(["none", "bm25"]), default="none", show_default=True,
              help="Fine-tuning: bm25 adds each query's highest-ranked wrong document to its batch.")
@click.option("--max-pairs", default=None, type=int, help="Use only this many training pairs.")
@click.option("--tree-queries", default=100, show_default=True, help="Queries evaluated in tree mode.")
@click.option("--matcher-pairs", default=3000, show_default=True, help="Training pairs the matchers see.")
@click.option("--matcher-epochs", default=10, show_default=True, help="Matcher training epochs.")
@click.option("--baseline", default=None, metavar="NAME_OR_PATH",
              help="A sentence-transformers model (hub name or folder) to compare with: after the mixret models, it "
                   "is fine-tuned with MultipleNegativesRankingLoss on the same training pairs for the same minutes "
                   "and threads each of them had (outside the budget), its fusion weight fitted on the same "
                   "validation slice, and scored in the same table (vector and fusion, won/lost against the same "
                   "fitted BM25, documents embedded per second). Needs pip install 'mixret[st]'.")
@click.option("--seed", default=0, show_default=True)
@friendly
def quickstart_cmd(out, budget_minutes, pairs_path, test_pairs_path, query_field, target_field, pretrain_share,
                   d_model, layers, context, batch_size, hard_negatives, max_pairs, tree_queries, matcher_pairs,
                   matcher_epochs, baseline, seed):
    """Run the whole pipeline: train a masked mixer and a llama baseline of the same size for the same wall-clock
    time (contrastive fine-tuning, after optional CLM pretraining), train a matcher for each, index, evaluate
    vector, fusion, hybrid, tree and BM25 on the held-out pairs, print one comparison table (also saved as
    OUT/results.md and OUT/results.json), then one example search. On the bundled corpus unless --pairs (and
    --test-pairs) name your own."""
    cfg = QuickstartConfig(out=out, budget_minutes=budget_minutes, pairs=pairs_path, test_pairs=test_pairs_path,
                           query_field=query_field, target_field=target_field, pretrain_share=pretrain_share,
                           d_model=d_model, layers=layers, context=context, batch_size=batch_size,
                           hard_negatives=hard_negatives, max_pairs=max_pairs, tree_queries=tree_queries,
                           matcher_pairs=matcher_pairs, matcher_epochs=matcher_epochs, baseline=baseline, seed=seed)
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
