"""The text-only objectives' shared half: `TrainConfig` (the options of `mixret pretrain`, every objective's) and
`TextTask` (the corpus, tokenizer, model and run folder that clm, spans and distill train on)."""
from __future__ import annotations

import dataclasses
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from mixret import io
from mixret.data import BUNDLED_TEST_FRACTION, bundled_pairs_path, bundled_training_texts, load_texts, sources_record
from mixret.distributed import Distributed
from mixret.errors import MixretError
from mixret.models.config import ModelConfig, model_options
from mixret.models.encode import POOLINGS
from mixret.models.zoo import build_model, load
from mixret.options import nested, option, option_fields, read_options_file
from mixret.tokenizer import BPE_KINDS, load_tokenizer, make_tokenizer
from mixret.training import loop
from mixret.training.loop import LoopConfig, Task
from mixret.training.train_data import (
    BPE_SAMPLE_CHARS,
    Stream,
    corpus_fingerprint,
    document_sequences,
    micro_batches,
    packed_sequences,
    sample_texts,
    split_documents,
    tokenize_corpus,
    tokenizer_from_text,
    tokenizer_text,
)

DEFAULT_STEPS = 800


# Longest context the trainer accepts per arch: a masked mixer holds context x context mixing matrices per
# layer, so its parameters and activations grow with context^2.
MAX_CONTEXT = {"masked-mixer": 16384, "hypermixer": 65536, "llama": 65536}


MODEL_OPTIONS = model_options()           # option name (d_model, layers, ...) -> ModelConfig field
LOOP_OPTIONS = {n: f for n, f in option_fields(LoopConfig).items() if f.metadata.get("cli", True)
                and n != "min_lr_ratio"}  # the loop's options a run takes (steps, lr, ...) -> LoopConfig field


PRETRAIN_LOOP = {"lr": 4e-3, "weight_decay": 0.1, "eval_every": 200, "checkpoint_every": 500}  # pretraining's loop
PRETRAIN_MODEL = {"d_model": 128, "n_layers": 4, "context": 256}  # smaller than ModelConfig's defaults


OBJECTIVES = ("clm", "spans", "distill")
DISTILL_LOSSES = ("cosine", "mse")


@dataclass(init=False)
class TrainConfig:
    """Everything `mixret pretrain` (and `mixret distill`) takes, every text-only objective's; options not given take
    the objective's defaults (OBJECTIVE_DEFAULTS) before the fields' own."""
    # data
    data: list[str] | None = option(
        None, "Texts: .txt (one document a line, or separated by <|endoftext|>), .jsonl/.jsonl.gz, .parquet, a folder "
              "of these, or a Hugging Face dataset name. Repeat for several.",
        show="the training split of the bundled pairs (summaries and documents; the test split is left out)")
    text_field: list[str] = option(help="JSONL field / column holding the text; repeat to read several fields of each "
                                        "record as separate documents.", factory=lambda: ["text"])
    val_fraction: float = option(0.05, "Fraction of documents held out for validation (drawn with the seed).")
    val_max_docs: int = option(5000, "Most documents held out for validation.")
    pack: bool = option(False, "clm: concatenate documents into full-context rows instead of one document per "
                               "sequence.")
    # tokenizer
    tokenizer: str = option("bpe", "bpe (trained on the training split), bpe-lower (the same, case folded), bytes, or "
                                   "the path of a tokenizer.json (spans, distill: bpe-lower).")
    vocab_size: int = option(4096, "BPE vocabulary size.")
    # model: every ModelConfig option but vocab_size (which the tokenizer sets)
    model: ModelConfig = nested(lambda: ModelConfig(**PRETRAIN_MODEL), "the model")
    # optimisation
    loop: LoopConfig = nested(lambda: LoopConfig(**PRETRAIN_LOOP), "the schedule", exclude=("min_lr_ratio",),
                              show={"steps": str(DEFAULT_STEPS)})
    epochs: float | None = option(None, "Schedule length in passes over the training split (instead of --steps).")
    batch_size: int = option(16, "Sequences per micro-batch on each process (spans, distill: 32).")
    label_smoothing: float = option(0.0, "clm: label smoothing of the training loss.")
    seed: int = option(0, "Seed for initialisation, data order and the validation split.")
    # objective
    objective: str = option(
        "clm", "What the model learns from the texts. clm: next-token prediction (a language model). spans: a "
               "retriever from documents alone: a random span of each document is a query whose positive is its "
               "document and whose negatives are the batch's other documents (symmetric InfoNCE). distill: a "
               "sentence-transformers teacher's embedding of each text (see `mixret distill`). spans and distill "
               "default to --tokenizer bpe-lower, --batch-size 32, --lr 0.001 and --mixing-init mean, and the model "
               "records its pooling, so embed, search, evaluate and finetune --model use it as it is.",
        choices=OBJECTIVES)
    pooling: str = option("last", "spans, distill: the embedding trained.", choices=POOLINGS)
    temperature: float = option(0.05, "spans, distill with --pairs: temperature of the InfoNCE logits.")
    span_min: int = option(8, "spans: fewest tokens of a span (at most half of its document).")
    span_max: int = option(24, "spans: most tokens of a span.")
    teacher: str | None = option(
        None, "distill: the teacher, a sentence-transformers model name (Hugging Face hub) or folder. Its embeddings "
              "of the texts are computed once, before training (a --budget-minutes counts the student's training "
              "only), and cached under $MIXRET_CACHE/teacher by the teacher's identity (name or path and a hash of "
              "its weights) and a hash of the texts.")
    init: str | None = option(None, "A model folder to start from (its size and tokenizer; the model options are "
                                    "then ignored): clm trains it on as a language model, spans and distill train "
                                    "its embedding (a language model's gets the embedding head, as in finetune): e.g. "
                                    "clm, then spans from the CLM model.",
                              show="a new model of the options' size")
    distill_loss: str = option("cosine", "distill: distance to the teacher's embedding, through a learned isometry "
                                         "between the two widths (it keeps angles, so the student's own embedding, "
                                         "the one saved, has the geometry the loss trained).", choices=DISTILL_LOSSES)
    pairs: str | None = option(None, "distill: a pairs file whose training split (split_pairs' test split, a tenth by "
                                     "a hash of the id, is never read) adds in-batch InfoNCE to the distillation loss.")
    query_field: str = option("summary", "distill --pairs: the field with the queries.")
    target_field: str = option("document", "distill --pairs: the field with the documents.")
    # run
    out: str | None = option(None, "Output directory.", show="runs/ARCH-DATE-TIME")
    num_workers: int = option(0, "Processes for tokenization.")
    resume: bool = option(False, "Continue the run in --out from its newest checkpoint (its saved options apply "
                                 "unless given again).", switch="--resume")
    overwrite: bool = option(False, "Replace the run in --out.", switch="--overwrite")

    def __init__(self, model: ModelConfig | None = None, loop: LoopConfig | None = None, **options):
        """Options by name; model options either as `model` or by their option names (d_model=, layers=), loop
        options as `loop` or by name (steps=, lr=). Options not given take the objective's defaults
        (OBJECTIVE_DEFAULTS) before the fields' own."""
        fields = {f.name: f for f in dataclasses.fields(self) if f.name not in ("model", "loop")}
        for name, value in OBJECTIVE_DEFAULTS.get(options.get("objective", "clm"), {}).items():
            if name not in options and not (model is not None and name in MODEL_OPTIONS) \
                    and not (loop is not None and name in LOOP_OPTIONS):
                options = {**options, name: value}
        in_model, in_loop = {}, {}
        for name, value in options.items():
            if name in MODEL_OPTIONS:
                in_model[MODEL_OPTIONS[name].name] = value
            elif name in LOOP_OPTIONS:
                in_loop[LOOP_OPTIONS[name].name] = value
            elif name not in fields:
                raise TypeError(f"TrainConfig got an unexpected option {name!r}")
        for name, f in fields.items():
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            setattr(self, name, options.get(name, default))
        model = model if model is not None else ModelConfig(**PRETRAIN_MODEL)
        self.model = dataclasses.replace(model, **in_model) if in_model else model
        loop = loop if loop is not None else LoopConfig(**PRETRAIN_LOOP)
        self.loop = dataclasses.replace(loop, **in_loop) if in_loop else loop

    def validate(self) -> None:
        for name in ("val_max_docs", "vocab_size", "batch_size"):
            _check_int(self, name, minimum=1)
        for name in ("grad_accum", "log_every", "eval_every", "checkpoint_every"):
            _check_int(self.loop, name, minimum=1)
        _check_int(self, "seed", minimum=0)
        _check_int(self, "num_workers", minimum=0)
        for name in ("steps", "stop_after"):
            if getattr(self.loop, name) is not None:
                _check_int(self.loop, name, minimum=1)
        if self.loop.warmup is not None:
            _check_int(self.loop, "warmup", minimum=0)
        length = {"steps": self.loop.steps, "epochs": self.epochs, "budget_minutes": self.loop.budget_minutes}
        lengths = [n for n, v in length.items() if v is not None]
        if len(lengths) > 1:
            raise MixretError(f"give one length: either steps or epochs or budget_minutes, not {' and '.join(lengths)}")
        for name in ("epochs", "budget_minutes"):
            v = length[name]
            if v is not None and not (_is_number(v) and v > 0):
                raise MixretError(f"{name} must be a positive number, got {v!r}")
        for name, lo, hi in (("val_fraction", 0.0, 1.0), ("label_smoothing", 0.0, 1.0)):
            v = getattr(self, name)
            if not (_is_number(v) and lo <= v < hi) or (name == "val_fraction" and v == 0):
                raise MixretError(f"{name} must be a number in {'(' if name == 'val_fraction' else '['}{lo}, {hi}), "
                                  f"got {v!r}")
        for name in ("lr", "grad_clip"):
            if not (_is_number(getattr(self.loop, name)) and getattr(self.loop, name) > 0):
                raise MixretError(f"{name} must be a positive number, got {getattr(self.loop, name)!r}")
        if not (_is_number(self.loop.weight_decay) and self.loop.weight_decay >= 0):
            raise MixretError(f"weight_decay must be a number >= 0, got {self.loop.weight_decay!r}")
        model = self.model
        model.validate()
        if model.context < 2:
            raise MixretError("context must be at least 2 (a token and the one it predicts)")
        if model.arch in MAX_CONTEXT and model.context > MAX_CONTEXT[model.arch]:
            raise MixretError(f"context {model.context} is larger than arch {model.arch!r} supports "
                              f"(at most {MAX_CONTEXT[model.arch]}"
                              f"{': its mixing matrices grow as context^2' if model.arch == 'masked-mixer' else ''})")
        if not isinstance(self.tokenizer, str) or not self.tokenizer:
            raise MixretError(f"tokenizer must be 'bpe', 'bpe-lower', 'bytes' or a path to a tokenizer.json, "
                              f"got {self.tokenizer!r}")
        if self.tokenizer in BPE_KINDS and self.vocab_size < 259:
            raise MixretError(f"vocab_size must be at least 259 for BPE (256 bytes and 3 special tokens), "
                              f"got {self.vocab_size}")
        if not self.text_field or not all(isinstance(f, str) and f for f in self.text_field):
            raise MixretError(f"text_field must name at least one field, got {self.text_field!r}")
        self.validate_objective()

    def validate_objective(self) -> None:

        if self.objective not in OBJECTIVES:
            raise MixretError(f"unknown objective {self.objective!r}; expected one of {', '.join(OBJECTIVES)} "
                              f"(clm: next-token prediction, spans: spans of the documents as queries, "
                              f"distill: a teacher's embeddings of the texts)")
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for name, owners in OBJECTIVE_OPTIONS.items():
            if self.objective not in owners and getattr(self, name) != defaults[name]:
                raise MixretError(f"option {name} applies to objective {' or '.join(map(repr, owners))}, "
                                  f"not {self.objective!r}")
        if self.init is not None and not (Path(self.init) / io.CONFIG_NAME).is_file():
            raise MixretError(f"{self.init}: no {io.CONFIG_NAME} there; expected a mixret model folder to start from")
        if self.objective == "distill":
            check_distill_options(self)
        if self.pooling not in POOLINGS:
            raise MixretError(f"unknown pooling {self.pooling!r}; expected one of {', '.join(POOLINGS)}")
        if not (_is_number(self.temperature) and self.temperature > 0):
            raise MixretError(f"temperature must be a positive number, got {self.temperature!r}")
        _check_int(self, "span_min", minimum=1)
        _check_int(self, "span_max", minimum=self.span_min)

    def model_config(self, vocab_size: int) -> ModelConfig:
        return dataclasses.replace(self.model, vocab_size=vocab_size)

    def loop_config(self) -> LoopConfig:
        return dataclasses.replace(self.loop)

    def to_dict(self) -> dict:
        """Flat options: the model's and the loop's by their option names, beside the others."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("model", "loop")}
        out.update({name: getattr(self.model, f.name) for name, f in MODEL_OPTIONS.items()})
        out.update({name: getattr(self.loop, f.name) for name, f in LOOP_OPTIONS.items()})
        return out

    @classmethod
    def from_dict(cls, d: dict, source: str = "options") -> "TrainConfig":
        options = {k.replace("-", "_"): v for k, v in d.items()}
        known = {f.name for f in dataclasses.fields(cls) if f.name not in ("model", "loop")} | set(MODEL_OPTIONS) \
            | set(LOOP_OPTIONS)
        unknown = sorted(set(options) - known)
        if unknown:
            raise MixretError(f"{source}: unknown option(s) {unknown}; expected some of {sorted(known)}")
        for name in ("data", "text_field"):
            if isinstance(options.get(name), str):
                options[name] = [options[name]]
            elif options.get(name) is not None:
                options[name] = list(options[name])
        return cls(**options)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_int(cfg: TrainConfig, name: str, minimum: int) -> None:
    v = getattr(cfg, name)
    if not isinstance(v, int) or isinstance(v, bool) or v < minimum:
        raise MixretError(f"{name} must be an integer >= {minimum}, got {v!r}")




# Options that only some objectives read: given (not left at the default) with another, they are an error.
OBJECTIVE_OPTIONS = {"pack": ("clm",), "label_smoothing": ("clm",), "pooling": ("spans", "distill"),
                     "temperature": ("spans", "distill"), "span_min": ("spans",), "span_max": ("spans",),
                     **{name: ("distill",) for name in ("teacher", "distill_loss", "pairs", "query_field",
                                                        "target_field")}}


# Defaults that differ by objective, for options not given. Spans train a retriever: a case-folded tokenizer (as
# finetune's), more in-batch negatives, a contrastive learning rate, and the running-mean mixing init, whose last
# position starts as the mean of the text, so that last-token pooling learns from the first step.
# Distillation trains an embedding too, with the same defaults.
RETRIEVER_DEFAULTS = {"tokenizer": "bpe-lower", "batch_size": 32, "lr": 1e-3, "mixing_init": "mean"}


OBJECTIVE_DEFAULTS = {"clm": {}, "spans": RETRIEVER_DEFAULTS, "distill": RETRIEVER_DEFAULTS}


# Options of one invocation, never saved with the run.
PER_INVOCATION = ("stop_after", "resume", "overwrite")


# Options that define the model and its data: a resumed run must keep them.
RUN_IDENTITY = ("data", "text_field", "val_fraction", "val_max_docs", "pack", "tokenizer", "vocab_size",
                *MODEL_OPTIONS, "seed", "objective", "pooling", "temperature", "span_min", "span_max", "teacher",
                "init", "distill_loss", "pairs", "query_field", "target_field")


SCHEDULE_LENGTH = ("steps", "epochs", "budget_minutes")  # one of them sets the schedule's length


def resolve_options(options: dict, config_file: str | os.PathLike | None = None) -> TrainConfig:
    """TrainConfig from, lowest priority first: the defaults, the saved options of the run being resumed
    (`resume` with an `out` holding train_config.json), a JSON config file, and `options` (the flags given)."""
    given = {}
    if config_file is not None:
        given = read_options_file(config_file)
        TrainConfig.from_dict(given, source=str(config_file))  # reject unknown names early, naming the file
    given.update(options)
    saved = {}
    saved_path = Path(given["out"]) / loop.TRAIN_CONFIG_NAME if given.get("out") else None
    if given.get("resume") and saved_path is not None and saved_path.is_file():
        saved = {k: v for k, v in io.read_json(saved_path, "run options").items() if k not in PER_INVOCATION}
        if any(k in given for k in SCHEDULE_LENGTH):  # a new length replaces the saved one, whatever its form
            for k in SCHEDULE_LENGTH:
                saved.pop(k, None)
    return TrainConfig.from_dict({**saved, **given}, source=str(config_file or "options"))


def _normalize_data(data: list[str] | None) -> list[str] | None:
    """Local sources as absolute paths (a run can be resumed from another folder); dataset names as given."""
    if data is None:
        return None
    return [str(Path(d).expanduser().resolve()) if Path(d).expanduser().exists() else str(d) for d in data]


def _normalize_path(source: str | None) -> str | None:
    return None if source is None else _normalize_data([source])[0]




def check_distill_options(cfg) -> None:
    """The options only distillation reads (called by TrainConfig.validate)."""
    if not cfg.teacher or not isinstance(cfg.teacher, str):
        raise MixretError("distill needs a teacher: a sentence-transformers model name or folder (--teacher)")
    if cfg.distill_loss not in DISTILL_LOSSES:
        raise MixretError(f"unknown distill loss {cfg.distill_loss!r}; expected one of {', '.join(DISTILL_LOSSES)}")


class TextTask(Task):
    """Texts in, a model out: what every text-only objective gives the loop. The corpus (its training split only
    is trained on), tokenizer, model, the order of the training documents by step, the run folder and the saved
    model are here; an objective subclass gives `make_objective`, `micro_batch`, `evaluate`, `describe_objective`
    and `result`. Everything that can fail on bad input happens in the constructor, before the first write."""
    files = (io.CONFIG_NAME, io.WEIGHTS_NAME, io.TOKENIZER_NAME)

    def __init__(self, cfg: TrainConfig, dist: Distributed):
        self.cfg, self.dist = cfg, dist
        self.start = None
        if cfg.init is not None:                  # the folder's model, size and tokenizer
            self.start = load(cfg.init)
            if self.start.tokenizer is None:
                raise MixretError(f"{cfg.init}: the model folder has no {io.TOKENIZER_NAME}")
            cfg.model = self.start.config
        if cfg.out is None:
            cfg.out = dist.broadcast_text(f"runs/{cfg.model.arch}-{time.strftime('%Y%m%d-%H%M%S')}")
        self.out = Path(cfg.out)
        self.mode = dist.broadcast_text(dist.on_main(lambda: loop.inspect_run_dir(
            self.out, cfg.to_dict(), RUN_IDENTITY, cfg.resume, cfg.overwrite, self.files, "mixret pretrain")) or "")
        if cfg.resume and self.mode == "fresh":
            self.say(f"{self.out}: no run to resume there; starting a new one")
        self.load_data()
        self.global_batch = cfg.batch_size * cfg.loop.grad_accum * dist.world_size
        if cfg.epochs is not None:
            cfg.loop.steps = max(1, math.ceil(cfg.epochs * len(self.train_seqs) / self.global_batch))
            cfg.epochs = None
        if cfg.loop.budget_minutes is None:
            cfg.loop.steps = cfg.loop.steps or DEFAULT_STEPS
        torch.manual_seed(cfg.seed)
        self.model = self.build_model().to(dist.device)
        self.objective = self.make_objective()
        self.describe()

    def say(self, message: str) -> None:
        loop.say(self.dist, message)

    def build_model(self):
        """A new model of the options' size, with the run's tokenizer and the record of its data; or the --init
        model, made ready for this objective, with this run's data added to its record."""
        if self.start is not None:
            lm = self.start
            lm.trained_on = (lm.trained_on or []) + self.trained_on
            self.continue_from(lm)
            lm.train()
            return lm
        model = build_model(self.cfg.model_config(self.tokenizer.vocab_size))
        model.tokenizer, model.trained_on = self.tokenizer, self.trained_on
        return model

    def continue_from(self, lm) -> None:
        """Make a trained model ready for this objective (next-token prediction: a language model again, its
        embedding head, if any, left as it is and out of training)."""
        lm.embedding_defaults = {}
        if lm.pool_head is not None:
            lm.pool_head.requires_grad_(False)

    # -- data ----------------------------------------------------------------------------------
    def load_data(self) -> None:

        cfg, dist = self.cfg, self.dist
        if cfg.data is None:  # the bundled pairs' training split only: their test split stays unseen
            texts = bundled_training_texts()
            self.trained_on = sources_record([bundled_pairs_path()], BUNDLED_TEST_FRACTION)
        else:
            texts = load_texts(cfg.data, text_field=cfg.text_field)
            self.trained_on = sources_record(cfg.data)
        column = texts.data.column("text")
        self.n_docs = len(texts)
        self.fingerprint = corpus_fingerprint(column)
        train_docs, val_docs = split_documents(self.n_docs, cfg.val_fraction, cfg.val_max_docs, cfg.seed)

        self.tokenizer = tokenizer_from_text(dist.broadcast_text(
            dist.on_main(lambda: tokenizer_text(self.make_tokenizer(column, train_docs))) or ""))
        if dist.local_rank != 0:  # one process per machine tokenizes; the others then read its cache
            dist.barrier()
        values, offsets = tokenize_corpus(texts, self.tokenizer, self.fingerprint, cfg.num_workers)
        if dist.local_rank == 0:
            dist.barrier()
        make = packed_sequences if cfg.pack else document_sequences
        self.train_seqs = make(values, offsets, train_docs, cfg.model.context)
        self.val_seqs = make(values, offsets, val_docs, cfg.model.context)
        for name, seqs in (("training", self.train_seqs), ("validation", self.val_seqs)):
            if len(seqs) == 0:
                raise MixretError(f"no {name} sequences of at least 2 tokens; expected a larger corpus")
        self.val_order = np.argsort(self.val_seqs.lengths(np.arange(len(self.val_seqs))), kind="stable")
        self.train_docs, self.val_docs = len(train_docs), len(val_docs)
        self.column, self.train_doc_ids, self.val_doc_ids = column, train_docs, val_docs

    def make_tokenizer(self, column, train_docs: np.ndarray):
        """The tokenizer the options ask for (the run's own one when resuming; the --init model's)."""
        if self.start is not None:
            return self.start.tokenizer
        saved = self.out / io.TOKENIZER_NAME
        if self.mode == "resume" and saved.is_file():
            return load_tokenizer(saved)
        texts = lambda: sample_texts(column, train_docs, BPE_SAMPLE_CHARS)  # noqa: E731
        return make_tokenizer(self.cfg.tokenizer, self.cfg.vocab_size, texts, self.say, "the training split")

    # -- what the loop asks for ------------------------------------------------------------------
    def batches(self, start: int, dist: Distributed, grad_accum: int) -> Iterator[list]:
        """This rank's micro-batches of each step from `start` on: the step's global batch is the stream's next
        batch_size * grad_accum * world_size sequences; micro-step k of rank r takes its j = (k * world_size + r)-th
        slice of batch_size, which micro_batch(idx, step, j) turns into the objective's input."""
        stream = Stream(len(self.train_seqs), self.cfg.seed)
        B = self.cfg.batch_size
        for step in range(start, 2**62):
            idx = stream.take(step * self.global_batch, self.global_batch)
            yield [self.micro_batch(part, step, k * dist.world_size + dist.rank)
                   for k, part in enumerate(micro_batches(idx, B, grad_accum, dist.world_size, dist.rank))]

    def record_extra(self, step: int) -> dict:
        return {"epoch": round(step * self.global_batch / len(self.train_seqs), 4)}

    def options(self) -> dict:
        return {k: v for k, v in self.cfg.to_dict().items() if k not in PER_INVOCATION}

    def prepare(self, directory: Path) -> None:
        self.tokenizer.save(directory / io.TOKENIZER_NAME)

    def save(self, directory: Path) -> None:
        self.model.save_pretrained(directory, self.tokenizer)

    def load(self, directory: Path) -> None:
        io.load_weights(self.model, directory)

    def describe(self) -> None:
        cfg, dist = self.cfg, self.dist
        if cfg.loop.steps is not None:
            epochs = cfg.loop.steps * self.global_batch / len(self.train_seqs)
            length = f"{cfg.loop.steps:,} steps of {self.global_batch} sequences (~{epochs:.2f} epochs)"
        else:
            length = f"{cfg.loop.budget_minutes:g} minutes of steps of {self.global_batch} sequences"
        source = "the bundled corpus's training split" if cfg.data is None else ", ".join(cfg.data)
        model = self.model.config
        self.say(
            f"data: {self.n_docs:,} documents from {source}: {self.train_docs:,} for training "
            f"({len(self.train_seqs):,} sequences{', packed' if cfg.pack else ''}, "
            f"{self.train_seqs.n_tokens:,} tokens), {self.val_docs:,} for validation\n"
            f"tokenizer: {self.tokenizer.kind}, {self.tokenizer.vocab_size:,} tokens\n"
            f"model: {model.arch}, {self.model.num_params():,} parameters (d_model {model.d_model}, "
            f"{model.n_layers} layers, context {model.context})\n"
            f"training: {length} on {dist.world_size} x {dist.device.type}; {self.describe_objective()}\n"
            f"output: {self.out}")
