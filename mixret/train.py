"""Pretraining: next-token prediction for any architecture of the model zoo.

    from mixret.train import TrainConfig, pretrain
    out_dir = pretrain(TrainConfig(data=["corpus.jsonl"], steps=2000))   # mixret.load(out_dir) reads the model

Each document is one training sequence, [bos] + tokens + [eos], truncated to the context (a truncated document
has no eos); with `pack` the documents are concatenated and cut into full-context rows instead. Batches are
right-padded to their longest member. The loss of an optimizer step is the sum of the cross-entropy of every
predicted token of the step (every micro-batch, every rank) divided by their number, so gradient accumulation
and DistributedDataParallel make exactly the update of one large batch.

The order of the training sequences is a function of the seed and the step alone (an endless stream of
seeded permutations, one per epoch), so a run resumed from a checkpoint sees the same batches as a run that
never stopped.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import math
import os
import resource
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from mixret import checkpoint as ckpt
from mixret import io
from mixret.errors import MixretError
from mixret.models import ModelConfig, build_model
from mixret.train_data import (BPE_SAMPLE_CHARS, Stream, corpus_fingerprint, document_sequences,
                               micro_batches, packed_sequences, sample_texts, split_documents, tokenize_corpus,
                               tokenizer_from_text, tokenizer_text, unigram_loss)

TRAIN_CONFIG_NAME = "train_config.json"
METRICS_NAME = "metrics.jsonl"
CURVE_NAME = "training_curve.png"
RUN_FILES = (TRAIN_CONFIG_NAME, io.CONFIG_NAME, io.WEIGHTS_NAME, io.TOKENIZER_NAME, METRICS_NAME, CURVE_NAME,
             ckpt.CHECKPOINTS)
DEFAULT_STEPS = 800
# Longest context the trainer accepts per arch: a masked mixer holds context x context mixing matrices per
# layer, so its parameters and activations grow with context^2.
MAX_CONTEXT = {"masked-mixer": 16384, "hypermixer": 65536, "llama": 65536}
MIN_LR_RATIO = 0.1               # cosine decay ends at this fraction of the peak learning rate
BETAS = (0.9, 0.95)

def sample_line(model, tokenizer) -> str:
    """A short seeded sample from the model being trained, on one line."""
    from mixret.generate import sample_text
    text = " ".join(sample_text(model, tokenizer, max_new_tokens=32).split())
    return f"sample: {text[:200]}"


sample_hook: Callable | None = sample_line
"""Called as sample_hook(model, tokenizer) at each evaluation on rank 0, with the model in eval mode;
a returned string is printed under the evaluation line. Set to None for no samples."""


# --- options ----------------------------------------------------------------------------------

@dataclass
class TrainConfig:
    # data
    data: list[str] | None = None         # files, folders or Hugging Face dataset names; None: the bundled corpus
    text_field: list[str] = field(default_factory=lambda: ["text"])  # JSONL field(s) / column(s) to read
    val_fraction: float = 0.05            # documents held out for validation (chosen by the seed) ...
    val_max_docs: int = 5000              # ... at most this many
    pack: bool = False                    # concatenate documents into full-context rows
    # tokenizer
    tokenizer: str = "bpe"                # "bpe" (trained on the training split), "bytes" or a tokenizer.json
    vocab_size: int = 4096                # BPE vocabulary size
    # model
    arch: str = "masked-mixer"
    d_model: int = 128
    layers: int = 4
    context: int = 256
    dropout: float = 0.0
    drop_path: float = 0.0
    tie_embeddings: bool = False
    mixer_expand: bool = False
    mixer_heads: int = 1
    mixer_kernel: int = 1
    hyper_dim: int = 64
    hyper_heads: int = 1
    n_heads: int = 4
    # optimisation
    steps: int | None = None              # length of the whole schedule (default DEFAULT_STEPS) ...
    epochs: float | None = None           # ... or given as passes over the training split
    batch_size: int = 16                  # sequences per micro-batch on each process
    grad_accum: int = 1                   # micro-batches per optimizer step
    lr: float = 4e-3
    warmup: int | None = None             # linear warmup steps (default: 5% of the steps)
    weight_decay: float = 0.1             # on matrices only
    grad_clip: float = 1.0
    label_smoothing: float = 0.0
    seed: int = 0
    # run
    out: str | None = None                # default: runs/<arch>-<date>-<time>
    log_every: int = 10
    eval_every: int = 200
    checkpoint_every: int = 500
    compile: bool = False
    num_workers: int = 0                  # processes for tokenization
    stop_after: int | None = None         # end this invocation after this many steps, with a checkpoint
    resume: bool = False
    overwrite: bool = False

    def validate(self) -> None:
        for name in ("val_max_docs", "vocab_size", "d_model", "layers", "context", "mixer_heads", "mixer_kernel",
                     "hyper_dim", "hyper_heads", "n_heads", "batch_size", "grad_accum", "log_every", "eval_every",
                     "checkpoint_every"):
            _check_int(self, name, minimum=1)
        _check_int(self, "seed", minimum=0)
        _check_int(self, "num_workers", minimum=0)
        for name in ("steps", "stop_after"):
            if getattr(self, name) is not None:
                _check_int(self, name, minimum=1)
        if self.warmup is not None:
            _check_int(self, "warmup", minimum=0)
        if self.steps is not None and self.epochs is not None:
            raise MixretError("give either steps or epochs, not both")
        if self.epochs is not None and not (_is_number(self.epochs) and self.epochs > 0):
            raise MixretError(f"epochs must be a positive number, got {self.epochs!r}")
        for name, lo, hi in (("val_fraction", 0.0, 1.0), ("label_smoothing", 0.0, 1.0), ("dropout", 0.0, 1.0),
                             ("drop_path", 0.0, 1.0)):
            v = getattr(self, name)
            if not (_is_number(v) and lo <= v < hi) or (name == "val_fraction" and v == 0):
                raise MixretError(f"{name} must be a number in {'(' if name == 'val_fraction' else '['}{lo}, {hi}), "
                                  f"got {v!r}")
        for name in ("lr", "grad_clip"):
            if not (_is_number(getattr(self, name)) and getattr(self, name) > 0):
                raise MixretError(f"{name} must be a positive number, got {getattr(self, name)!r}")
        if not (_is_number(self.weight_decay) and self.weight_decay >= 0):
            raise MixretError(f"weight_decay must be a number >= 0, got {self.weight_decay!r}")
        if self.context < 2:
            raise MixretError("context must be at least 2 (a token and the one it predicts)")
        if self.arch in MAX_CONTEXT and self.context > MAX_CONTEXT[self.arch]:
            raise MixretError(f"context {self.context} is larger than arch {self.arch!r} supports "
                              f"(at most {MAX_CONTEXT[self.arch]}"
                              f"{': its mixing matrices grow as context^2' if self.arch == 'masked-mixer' else ''})")
        if not isinstance(self.tokenizer, str) or not self.tokenizer:
            raise MixretError(f"tokenizer must be 'bpe', 'bytes' or a path to a tokenizer.json, got {self.tokenizer!r}")
        if self.tokenizer == "bpe" and self.vocab_size < 259:
            raise MixretError(f"vocab_size must be at least 259 for BPE (256 bytes and 3 special tokens), "
                              f"got {self.vocab_size}")
        if not self.text_field or not all(isinstance(f, str) and f for f in self.text_field):
            raise MixretError(f"text_field must name at least one field, got {self.text_field!r}")
        self.model_config(vocab_size=259)  # the arch and its options are checked by ModelConfig

    def model_config(self, vocab_size: int) -> ModelConfig:
        c = self
        return ModelConfig(arch=c.arch, vocab_size=vocab_size, d_model=c.d_model, n_layers=c.layers,
                           context=c.context, dropout=c.dropout, drop_path=c.drop_path,
                           tie_embeddings=c.tie_embeddings, mixer_expand=c.mixer_expand, mixer_heads=c.mixer_heads,
                           mixer_kernel=c.mixer_kernel, hyper_dim=c.hyper_dim, hyper_heads=c.hyper_heads,
                           n_heads=c.n_heads)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict, source: str = "options") -> "TrainConfig":
        d = {k.replace("-", "_"): v for k, v in d.items()}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise MixretError(f"{source}: unknown option(s) {unknown}; expected some of {sorted(known)}")
        if isinstance(d.get("data"), str):
            d["data"] = [d["data"]]
        if isinstance(d.get("text_field"), str):
            d["text_field"] = [d["text_field"]]
        for name in ("data", "text_field"):
            if d.get(name) is not None:
                d[name] = list(d[name])
        return cls(**d)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_int(cfg: TrainConfig, name: str, minimum: int) -> None:
    v = getattr(cfg, name)
    if not isinstance(v, int) or isinstance(v, bool) or v < minimum:
        raise MixretError(f"{name} must be an integer >= {minimum}, got {v!r}")


# Options of one invocation, never saved with the run.
PER_INVOCATION = ("stop_after", "resume", "overwrite")
# Options that define the model and its data: a resumed run must keep them.
RUN_IDENTITY = ("data", "text_field", "val_fraction", "val_max_docs", "pack", "tokenizer", "vocab_size", "arch",
                "d_model", "layers", "context", "dropout", "drop_path", "tie_embeddings", "mixer_expand",
                "mixer_heads", "mixer_kernel", "hyper_dim", "hyper_heads", "n_heads", "seed")


def resolve_options(options: dict, config_file: str | os.PathLike | None = None) -> TrainConfig:
    """TrainConfig from, lowest priority first: the defaults, the saved options of the run being resumed
    (`resume` with an `out` holding train_config.json), a JSON config file, and `options` (the flags given)."""
    given = {}
    if config_file is not None:
        given = io.read_json(config_file, "config file")
        if not isinstance(given, dict):
            raise MixretError(f"{config_file}: expected a JSON object of options")
        given = {k.replace("-", "_"): v for k, v in given.items()}
        TrainConfig.from_dict(given, source=str(config_file))  # reject unknown names early, naming the file
    given.update(options)
    saved = {}
    saved_path = Path(given["out"]) / TRAIN_CONFIG_NAME if given.get("out") else None
    if given.get("resume") and saved_path is not None and saved_path.is_file():
        saved = {k: v for k, v in io.read_json(saved_path, "run options").items() if k not in PER_INVOCATION}
        if "steps" in given or "epochs" in given:  # a new length replaces the saved one, whichever form it takes
            saved.pop("steps", None)
            saved.pop("epochs", None)
    return TrainConfig.from_dict({**saved, **given}, source=str(config_file or "options"))


# --- distributed ------------------------------------------------------------------------------

@dataclass
class Dist:
    """This process's place in a (possibly single-process) run."""
    rank: int = 0
    local_rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    owns_group: bool = False  # this module created the process group (and destroys it)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """All-reduce sum of a tensor on self.device."""
        if self.world > 1:
            dist.all_reduce(t)
        return t

    def broadcast_text(self, text: str) -> str:
        """Rank 0's `text` on every rank."""
        if self.world == 1:
            return text
        raw = text.encode("utf-8") if self.main else b""
        n = torch.tensor([len(raw)], dtype=torch.int64, device=self.device)
        dist.broadcast(n, 0)
        if self.main:
            data = torch.frombuffer(bytearray(raw), dtype=torch.uint8).to(self.device) if raw else \
                torch.empty(0, dtype=torch.uint8, device=self.device)
        else:
            data = torch.empty(int(n), dtype=torch.uint8, device=self.device)
        if int(n):
            dist.broadcast(data, 0)
        return data.cpu().numpy().tobytes().decode("utf-8")

    def on_main(self, fn: Callable):
        """Run fn on rank 0 only; a MixretError raised there is raised on every rank."""
        result, error = None, ""
        if self.main:
            try:
                result = fn()
            except MixretError as e:
                error = str(e) or type(e).__name__
        error = self.broadcast_text(error)
        if error:
            raise MixretError(error)
        return result


def init_distributed() -> Dist:
    """CUDA if available, else CPU; a process group when launched by torchrun (WORLD_SIZE > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
        torch.set_float32_matmul_precision("high")  # TF32 for what runs outside bf16 autocast
    else:
        device = torch.device("cpu")
    if world == 1:
        return Dist(device=device)
    owns = not dist.is_initialized()
    if owns:
        # generous timeout: the other ranks wait while rank 0 trains the tokenizer and tokenizes a corpus
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(hours=1))
    return Dist(rank=dist.get_rank(), local_rank=local_rank, world=dist.get_world_size(), device=device,
                owns_group=owns)


# --- run directory ----------------------------------------------------------------------------

def _normalize_data(data: list[str] | None) -> list[str] | None:
    """Local sources as absolute paths (a run can be resumed from another folder); dataset names as given."""
    if data is None:
        return None
    return [str(Path(d).expanduser().resolve()) if Path(d).expanduser().exists() else str(d) for d in data]


def _differences(saved: dict, cfg: TrainConfig) -> list[str]:
    now = cfg.to_dict()
    return [f"{k} {saved.get(k)!r} there, {now[k]!r} here" for k in RUN_IDENTITY if saved.get(k) != now[k]]


def inspect_run_dir(out: Path, cfg: TrainConfig) -> str:
    """'fresh', 'resume' or 'overwrite'; a MixretError when `out` holds a run these options may not touch."""
    if out.exists() and not out.is_dir():
        raise MixretError(f"{out}: exists and is not a directory; expected an output directory")
    present = [name for name in RUN_FILES if (out / name).exists()]
    if not present:
        return "fresh"
    saved_path = out / TRAIN_CONFIG_NAME
    saved = io.read_json(saved_path, "run options") if saved_path.is_file() else None
    diffs = _differences(saved, cfg) if saved is not None else None
    if cfg.resume:
        if saved is None:
            raise MixretError(f"{out}: holds a model not written by `mixret pretrain` (no {TRAIN_CONFIG_NAME}), "
                              "so there is no run to resume; choose another --out, or --overwrite to replace it")
        if diffs:
            raise MixretError(f"{out}: holds a different model ({'; '.join(diffs)}); cannot resume it with these "
                              "options. Drop the differing options to continue it, or choose another --out")
        return "resume"
    if cfg.overwrite:
        return "overwrite"
    what = "a different model" if diffs or saved is None else "a model from an earlier run"
    detail = f": {'; '.join(diffs)}" if diffs else f" ({', '.join(present)})"
    raise MixretError(f"{out}: already holds {what}{detail}; pass --resume to continue that run, --overwrite to "
                      "replace it, or choose another --out")


def clear_run_dir(out: Path) -> None:
    """Delete what a pretraining run writes in `out` (and nothing else)."""
    for name in RUN_FILES:
        p = out / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


class MetricsLog:
    """metrics.jsonl: one JSON object a line, appended and flushed as training goes."""

    def __init__(self, path: Path, enabled: bool, keep_until: int):
        """Opens the log, keeping only complete lines with step <= keep_until (0: a fresh log)."""
        self.path, self.enabled = path, enabled
        if not enabled:
            return
        kept = []
        if keep_until > 0 and path.is_file():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by a crash
                if rec.get("step", 0) <= keep_until:
                    kept.append(line + "\n")
        io.atomic_write_text(path, "".join(kept))

    def write(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")


def plot_curve(metrics_path: Path, png_path: Path, unigram: float | None) -> None:
    """training_curve.png: train and validation loss against step (written atomically)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    recs = [json.loads(line) for line in metrics_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    fig = Figure(figsize=(7, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    train = [(r["step"], r["loss"]) for r in recs if r.get("loss") is not None]
    val = [(r["step"], r["val_loss"]) for r in recs if r.get("val_loss") is not None]
    if train:
        ax.plot(*zip(*train), label="train")
    if val:
        ax.plot(*zip(*val), "o-", label="validation")
    if unigram is not None:
        ax.axhline(unigram, color="gray", linestyle="--", label="unigram (validation)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    with io.atomic_path(png_path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)


# --- optimisation -----------------------------------------------------------------------------

def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices (parameters of 2 or more dimensions) only."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=BETAS, fused=device.type == "cuda")


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warmup to 1 over `warmup` steps, then cosine decay to MIN_LR_RATIO at `total`."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return MIN_LR_RATIO + (1 - MIN_LR_RATIO) * 0.5 * (1 + math.cos(math.pi * progress))


class NextTokenLoss(torch.nn.Module):
    """The training objective around a causal LM: a batch's summed next-token cross-entropy.

    The LM head runs only at the positions that predict a real token, so padding costs no head compute.
    """

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, targets: torch.Tensor,
                label_smoothing: float = 0.0) -> torch.Tensor:
        h = self.model.hidden(input_ids).flatten(0, 1)                # [B*L, D]
        logits = self.model.lm_head(h.index_select(0, positions))     # [N, V]
        return F.cross_entropy(logits.float(), targets, reduction="sum", label_smoothing=label_smoothing)


def peak_memory_mb(device: torch.device) -> float:
    """Peak GPU memory allocated, or the process's peak resident memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


def progress_line(step: int, total: int, record: dict, elapsed: float, steps_done: int) -> str:
    """'step 20/400: loss 5.1234, validation loss 5.2345, 12,345 tok/s, 1m05s left' from a metrics record."""
    parts = [f"loss {record['loss']:.4f}"] if "loss" in record else []
    if "val_loss" in record:
        parts.append(f"validation loss {record['val_loss']:.4f}")
    if "tokens_per_s" in record:
        parts.append(f"{record['tokens_per_s']:,} tok/s")
    if steps_done and step < total:
        left = round(elapsed / steps_done * (total - step))
        parts.append(f"{left // 3600}h{left // 60 % 60:02d}m left" if left >= 3600
                     else f"{left // 60}m{left % 60:02d}s left")
    return f"step {step}/{total}: " + ", ".join(parts)


class Interrupted(Exception):
    """Training stopped by SIGINT or SIGTERM; a checkpoint was written first."""

    def __init__(self, signum: int, step: int, checkpoint: Path):
        super().__init__(f"stopped by {signal.Signals(signum).name} at step {step}; checkpoint: {checkpoint}")
        self.signum, self.step, self.checkpoint = signum, step, checkpoint


@contextlib.contextmanager
def stop_signals() -> Iterator[list[int]]:
    """Within the block SIGINT and SIGTERM only record themselves in the yielded list (a second SIGINT
    raises KeyboardInterrupt at once)."""
    received: list[int] = []

    def handler(signum, frame):
        if received and signum == signal.SIGINT:
            raise KeyboardInterrupt
        received.append(signum)

    if threading.current_thread() is not threading.main_thread():
        yield received  # signal handlers can only be set from the main thread
        return
    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield received
    finally:
        for s, h in old.items():
            signal.signal(s, h)


# --- the trainer ------------------------------------------------------------------------------

def pretrain(cfg: TrainConfig) -> Path:
    """Train a causal LM as `cfg` says; returns a directory mixret.load reads: the output directory when the
    schedule is complete, or the checkpoint written when `stop_after` ended the run early.

    Raises MixretError for bad options or input (before anything is written) and Interrupted when SIGINT or
    SIGTERM stopped training (after writing a checkpoint).
    """
    cfg = dataclasses.replace(cfg, data=_normalize_data(cfg.data),
                              text_field=[cfg.text_field] if isinstance(cfg.text_field, str) else list(cfg.text_field))
    cfg.validate()
    d = init_distributed()
    try:
        return Trainer(cfg, d).run()
    finally:
        if d.owns_group and dist.is_initialized():
            dist.destroy_process_group()


class Trainer:
    """One pretraining run. Everything that can fail on bad input happens before the first write."""

    def __init__(self, cfg: TrainConfig, d: Dist):
        self.cfg, self.d = cfg, d
        if cfg.out is None:
            cfg.out = d.broadcast_text(f"runs/{cfg.arch}-{time.strftime('%Y%m%d-%H%M%S')}")
        self.out = Path(cfg.out)
        self.mode = d.broadcast_text(d.on_main(lambda: inspect_run_dir(self.out, cfg)) or "")
        if cfg.resume and self.mode == "fresh":
            self.say(f"{self.out}: no run to resume there; starting a new one")
        self.load_data()
        self.resolve_schedule()
        self.resume_from = self.find_checkpoint() if self.mode == "resume" else None
        self.prepare_run_dir()
        self.build()

    def say(self, message: str) -> None:
        if self.d.main:
            from tqdm.auto import tqdm
            tqdm.write(message, file=sys.stderr)

    # -- data ----------------------------------------------------------------------------------
    def load_data(self) -> None:
        from mixret.data import (BUNDLED_TEST_FRACTION, bundled_pairs_path, bundled_training_texts, load_texts,
                                 sources_record)

        cfg, d = self.cfg, self.d
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

        self.tokenizer = tokenizer_from_text(d.broadcast_text(
            d.on_main(lambda: tokenizer_text(self.make_tokenizer(column, train_docs))) or ""))
        if d.local_rank != 0:  # one process per machine tokenizes; the others then read its cache
            d.barrier()
        values, offsets = tokenize_corpus(texts, self.tokenizer, self.fingerprint, cfg.num_workers)
        if d.local_rank == 0:
            d.barrier()
        make = packed_sequences if cfg.pack else document_sequences
        self.train_seqs = make(values, offsets, train_docs, cfg.context)
        self.val_seqs = make(values, offsets, val_docs, cfg.context)
        for name, seqs in (("training", self.train_seqs), ("validation", self.val_seqs)):
            if len(seqs) == 0:
                raise MixretError(f"no {name} sequences of at least 2 tokens; expected a larger corpus")
        self.val_order = np.argsort(self.val_seqs.lengths(np.arange(len(self.val_seqs))), kind="stable")
        self.train_docs, self.val_docs = len(train_docs), len(val_docs)

    def make_tokenizer(self, column, train_docs: np.ndarray):
        """The tokenizer the options ask for (the run's own one when resuming)."""
        from mixret.tokenizer import BPETokenizer, ByteTokenizer, load_tokenizer

        saved = self.out / io.TOKENIZER_NAME
        if self.mode == "resume" and saved.is_file():
            return load_tokenizer(saved)
        if self.cfg.tokenizer == "bytes":
            return ByteTokenizer()
        if self.cfg.tokenizer != "bpe":
            return load_tokenizer(self.cfg.tokenizer)
        self.say(f"training a BPE tokenizer ({self.cfg.vocab_size:,} tokens) on the training split")
        return BPETokenizer.train(sample_texts(column, train_docs, BPE_SAMPLE_CHARS), vocab_size=self.cfg.vocab_size)

    # -- the run directory ---------------------------------------------------------------------
    def resolve_schedule(self) -> None:
        """steps (from epochs if given) and warmup."""
        cfg = self.cfg
        self.global_batch = cfg.batch_size * cfg.grad_accum * self.d.world
        if cfg.epochs is not None:
            cfg.steps = max(1, math.ceil(cfg.epochs * len(self.train_seqs) / self.global_batch))
            cfg.epochs = None
        cfg.steps = cfg.steps or DEFAULT_STEPS
        if cfg.warmup is None:
            cfg.warmup = max(1, cfg.steps // 20)

    def find_checkpoint(self) -> Path | None:
        """The newest complete checkpoint of the run being resumed, checked against the data and the schedule."""
        latest = ckpt.latest_checkpoint(self.out)
        if latest is None:
            self.say(f"{self.out}: no checkpoint yet; starting from step 0")
            return None
        state = io.read_json(latest / ckpt.STATE_NAME, "checkpoint state")
        if state.get("corpus") != self.fingerprint:
            raise MixretError(f"{latest}: the corpus has changed since this run started (its text differs); "
                              "expected the same data to resume, or a new run with another --out")
        if state["step"] > self.cfg.steps:
            raise MixretError(f"{latest}: the run is at step {state['step']}, beyond steps={self.cfg.steps}; "
                              f"expected steps >= {state['step']}")
        return latest

    def prepare_run_dir(self) -> None:
        def prepare():
            if self.mode == "overwrite":
                clear_run_dir(self.out)
            self.out.mkdir(parents=True, exist_ok=True)
            ckpt.remove_temporaries(self.out)
            saved = {k: v for k, v in self.cfg.to_dict().items() if k not in PER_INVOCATION}
            io.write_json(self.out / TRAIN_CONFIG_NAME, saved)
            self.tokenizer.save(self.out / io.TOKENIZER_NAME)

        self.d.on_main(prepare)

    # -- model, optimizer, schedule --------------------------------------------------------------
    def build(self) -> None:
        cfg, d = self.cfg, self.d
        torch.manual_seed(cfg.seed)
        self.model = build_model(cfg.model_config(self.tokenizer.vocab_size)).to(d.device)
        self.model.tokenizer = self.tokenizer
        self.model.trained_on = self.trained_on
        self.optimizer = make_optimizer(self.model, cfg, d.device)
        warmup, total = cfg.warmup, cfg.steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(s, warmup, total))
        self.stream = Stream(len(self.train_seqs), cfg.seed)
        self.step, self.position, self.last_lr = 0, 0, cfg.lr
        torch.manual_seed(cfg.seed + d.rank)  # dropout differs between ranks
        if self.resume_from is not None:
            self.restore(self.resume_from)
        objective = NextTokenLoss(self.model)
        self.loss_fn = torch.compile(objective, dynamic=True) if cfg.compile else objective
        self.train_loss_fn = self.loss_fn
        if d.world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP
            self.train_loss_fn = DDP(self.loss_fn, device_ids=[d.device.index] if d.device.type == "cuda" else None)

    def restore(self, directory: Path) -> None:
        """Continue from a checkpoint: weights, optimizer, scheduler, RNG states, step and data position."""
        state, opt_tensors, rng = ckpt.read_checkpoint(directory)
        io.load_weights(self.model, directory)
        self.optimizer.load_state_dict(ckpt.optimizer_from_flat(opt_tensors, state["optimizer"]))
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.position = state["step"], state["position"]
        # lr, weight decay and the schedule's length are the ones given now (they may differ from the run's)
        cfg = self.cfg
        self.scheduler.base_lrs = [cfg.lr] * len(self.optimizer.param_groups)
        for group, decay in zip(self.optimizer.param_groups, (cfg.weight_decay, 0.0)):
            group.update(initial_lr=cfg.lr, lr=cfg.lr * lr_factor(self.step, cfg.warmup, cfg.steps),
                         weight_decay=decay)
        mine = {k.split(".", 1)[1]: v for k, v in rng.items() if k.startswith(f"rank{self.d.rank}.")}
        if state.get("world_size") == self.d.world and mine:
            ckpt.set_torch_rng_state(mine, self.d.device)
        ckpt.set_host_rng_state(state["host_rng"])
        self.say(f"resuming from {directory} (step {self.step} of {self.cfg.steps})")

    def save_checkpoint(self) -> Path:
        """Write a checkpoint of the current step (every rank takes part; rank 0 writes)."""
        rng = {}
        for name, t in ckpt.torch_rng_state(self.d.device).items():
            parts = [t]
            if self.d.world > 1:
                t = t.to(self.d.device)
                parts = [torch.empty_like(t) for _ in range(self.d.world)]
                dist.all_gather(parts, t)
            rng.update({f"rank{r}.{name}": p.cpu() for r, p in enumerate(parts)})
        state = {"position": self.position, "scheduler": self.scheduler.state_dict(), "corpus": self.fingerprint,
                 "world_size": self.d.world, "epoch": self.position / len(self.train_seqs)}
        self.d.on_main(lambda: ckpt.save_checkpoint(self.out, self.step, self.model, self.tokenizer,
                                                    self.optimizer, state, rng))
        return self.out / ckpt.CHECKPOINTS / ckpt.step_dir_name(self.step)

    # -- steps ---------------------------------------------------------------------------------
    def autocast(self):
        if self.d.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def train_step(self) -> tuple[torch.Tensor, int, int]:
        """One optimizer step on the next global batch. Returns (this rank's summed loss, the step's predicted
        tokens over all ranks, its input tokens over all ranks)."""
        cfg, d = self.cfg, self.d
        B, K, W = cfg.batch_size, cfg.grad_accum, d.world
        idx = self.stream.take(self.position, self.global_batch)  # [B*K*W]: the whole step, every rank's part
        lengths = self.train_seqs.lengths(idx)
        n_targets = int((lengths - 1).sum())
        scale = W / n_targets  # DDP averages gradients over ranks; this makes the average the global mean
        loss_sum = torch.zeros((), device=d.device)
        for k, part in enumerate(micro_batches(idx, B, K, W, d.rank)):
            batch = self.train_seqs.batch(part, self.tokenizer.pad_id).to(d.device)
            sync = contextlib.nullcontext() if k == K - 1 or W == 1 else self.train_loss_fn.no_sync()
            with sync:
                with self.autocast():
                    loss = self.train_loss_fn(batch.input_ids, batch.positions, batch.targets, cfg.label_smoothing)
                (loss * scale).backward()
            loss_sum += loss.detach()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.last_lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.position += self.global_batch
        self.step += 1
        return loss_sum, n_targets, int(lengths.sum())

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean cross-entropy (no label smoothing) over every predicted token of the validation split."""
        B, d = self.cfg.batch_size, self.d
        self.model.eval()
        total = torch.zeros(2, dtype=torch.float64, device=d.device)  # [loss sum, predicted tokens]
        for b in range(d.rank, math.ceil(len(self.val_seqs) / B), d.world):
            batch = self.val_seqs.batch(self.val_order[b * B:(b + 1) * B], self.tokenizer.pad_id).to(d.device)
            with self.autocast():
                total[0] += self.loss_fn(batch.input_ids, batch.positions, batch.targets).double()
            total[1] += batch.targets.numel()
        d.sum(total)
        self.model.train()
        return float(total[0] / total[1])

    def stop_requested(self, received: list[int]) -> int:
        """The signal asking to stop, 0 if none; every rank gets the same answer."""
        if self.d.world == 1:
            return received[0] if received else 0
        flag = torch.tensor([received[0] if received else 0], device=self.d.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag)

    # -- the loop ------------------------------------------------------------------------------
    def run(self) -> Path:
        from tqdm.auto import tqdm

        cfg, d = self.cfg, self.d
        unigram = unigram_loss(self.train_seqs, self.val_seqs, self.tokenizer.vocab_size)
        self.describe(unigram)
        metrics = MetricsLog(self.out / METRICS_NAME, d.main, keep_until=self.step)
        start_step, val_loss, postfix = self.step, None, {}
        window_loss = torch.zeros((), device=d.device)  # this rank's loss sum since the last log line
        window_targets = window_tokens = 0
        window_start, paused = time.perf_counter(), 0.0  # paused: time spent evaluating and checkpointing
        self.model.train()
        bar = tqdm(total=cfg.steps, initial=self.step, unit="step", disable=None if d.main else True,
                   dynamic_ncols=True, file=sys.stderr)
        run_start = time.perf_counter()
        with stop_signals() as received:
            while self.step < cfg.steps:
                loss_sum, n_targets, n_tokens = self.train_step()
                window_loss += loss_sum
                window_targets += n_targets
                window_tokens += n_tokens
                bar.update(1)
                step, record = self.step, {}
                if step % cfg.log_every == 0 or step == cfg.steps:
                    loss = float(d.sum(window_loss.clone())) / window_targets
                    seconds = time.perf_counter() - window_start - paused
                    record.update(loss=round(loss, 5), lr=self.last_lr,
                                  tokens_per_s=round(window_tokens / max(seconds, 1e-9)),
                                  peak_mem_mb=round(peak_memory_mb(d.device), 1))
                    postfix.update(loss=f"{loss:.3f}", tok_s=f"{record['tokens_per_s']:,}")
                    window_loss.zero_()
                    window_targets = window_tokens = 0
                    window_start, paused = time.perf_counter(), 0.0
                t0 = time.perf_counter()
                if step % cfg.eval_every == 0 or step == cfg.steps:
                    val_loss = self.evaluate()
                    record["val_loss"] = round(val_loss, 5)
                    postfix["val"] = f"{val_loss:.3f}"
                    self.show_sample()
                if record:
                    metrics.write({"step": step, "epoch": round(self.position / len(self.train_seqs), 4),
                                   "val_loss": None, **record})
                    bar.set_postfix(postfix, refresh=False)
                    if bar.disable or "val_loss" in record:  # no progress bar (not a terminal): a log line
                        self.say(progress_line(step, cfg.steps, record, time.perf_counter() - run_start,
                                               step - start_step))
                if step % cfg.checkpoint_every == 0 and step < cfg.steps:
                    self.save_checkpoint()
                paused += time.perf_counter() - t0
                signum = self.stop_requested(received)
                if signum:
                    bar.close()
                    raise Interrupted(signum, step, self.save_checkpoint())
                if cfg.stop_after is not None and step - start_step >= cfg.stop_after and step < cfg.steps:
                    bar.close()
                    path = self.save_checkpoint()
                    self.say(f"stopped after {cfg.stop_after} steps, at step {step} of {cfg.steps}; "
                             f"checkpoint written to {path}")
                    return path
            bar.close()
        if val_loss is None:  # resumed at the end of the schedule: nothing was trained this time
            val_loss = self.evaluate()
        self.save_checkpoint()
        d.on_main(lambda: self.finish(unigram))
        self.say(f"done: {self.step} steps; validation loss {val_loss:.4f} (unigram model: {unigram:.4f})")
        return self.out

    def finish(self, unigram: float) -> None:
        """Write the final model and the training curve."""
        self.model.save_pretrained(self.out, self.tokenizer)
        if (self.out / METRICS_NAME).stat().st_size:
            plot_curve(self.out / METRICS_NAME, self.out / CURVE_NAME, unigram)

    def show_sample(self) -> None:
        if sample_hook is not None and self.d.main:
            self.model.eval()
            text = sample_hook(self.model, self.tokenizer)
            self.model.train()
            if text:
                self.say(text)

    def describe(self, unigram: float) -> None:
        cfg, d = self.cfg, self.d
        epochs = cfg.steps * self.global_batch / len(self.train_seqs)
        source = "the bundled corpus's training split" if cfg.data is None else ", ".join(cfg.data)
        self.say(
            f"data: {self.n_docs:,} documents from {source}: {self.train_docs:,} for training "
            f"({len(self.train_seqs):,} sequences{', packed' if cfg.pack else ''}, "
            f"{self.train_seqs.n_tokens:,} tokens), {self.val_docs:,} for validation\n"
            f"tokenizer: {self.tokenizer.kind}, {self.tokenizer.vocab_size:,} tokens\n"
            f"model: {cfg.arch}, {self.model.num_params():,} parameters (d_model {cfg.d_model}, "
            f"{cfg.layers} layers, context {cfg.context})\n"
            f"training: {cfg.steps:,} steps of {self.global_batch} sequences (~{epochs:.2f} epochs) on "
            f"{d.world} x {d.device.type}; a unigram model's validation loss is {unigram:.4f}\n"
            f"output: {self.out}")
