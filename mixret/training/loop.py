"""The one training loop: every mixret trainer hands it a Task and gets optimisation, checkpoints and logs.

A task gives only what is its own:

    class Task:  (a base class: the hooks below are no-ops in it)
        name: str                        # progress bar and messages ("pretrain", "train-matcher", ...)
        unit: str                        # what a loss weight counts, for throughput ("tokens" -> tokens_per_s)
        objective: nn.Module             # holds every trained parameter; forward(batch) -> (summed loss, weight)
        fingerprint: str                 # identifies the training data; a resumed run must see the same
        def batches(self, start: int, dist: Distributed, grad_accum: int) -> Iterator[list]: ...
            # from optimizer step `start` on, this rank's micro-batches of each step; the batches of a step
            # depend only on the step (and the seed), so a resumed run sees what an uninterrupted one saw
        def evaluate(self) -> dict: ...  # called on every rank in eval mode, without gradients; scalars or
                                         # nested dicts of scalars, printed and written to metrics.jsonl
        def save(self, directory: Path) -> None: ...  # the deliverable (a model folder), on rank 0
        def load(self, directory: Path) -> None: ...  # restore the trained weights from what save wrote
    optional (no-ops in the base class):
        metric_keys: tuple[str, ...]     # evaluate() keys present (as None) in every metrics.jsonl line
        files: tuple[str, ...]           # names `save` writes in the output folder
        def options(self) -> dict        # the run's options, saved as train_config.json
        def prepare(self, directory)     # write what a resumed run needs before the first step (rank 0)
        def on_step(self, step, loss)    # after each optimizer step: the step's mean loss (a 0-d tensor)
        def finish(self)                 # after the last step, before the final checkpoint (eval mode)
        def start_metrics(self) -> dict  # before the first step of a new run (eval mode, no gradients): the
                                         # metrics.jsonl line of step 0 (the loss before training, say)
        def record_extra(self, step) -> dict   # more fields for each metrics.jsonl line (e.g. the epoch)
        def relative_cost(self, step) -> float # the work of step `step` against the mean step (1.0 on average):
                                               # budget timing divides by it, for steps that differ in size
        curve_reference: tuple[float, str]     # a horizontal line on the training curve, and its label

The loss of an optimizer step is the sum of the objective's summed losses over every micro-batch of every
rank divided by the sum of their weights (tokens for a language model, queries for a matcher), so gradient
accumulation and DistributedDataParallel make exactly the update of one large batch.

A contrastive fine-tuning task fits unchanged: its objective module holds the encoder and a learned temperature
(a bare nn.Parameter, so it gets no weight decay), forward(batch of tokenized (query, document) pairs) returns
(sum of the InfoNCE losses of the batch's queries, number of queries), batches(start, ...) draws the pairs of
step s from a generator seeded by (seed, s), evaluate() returns {"R@1": ...} every `eval_every` steps, and
save() writes the encoder with save_pretrained (plus the temperature, which load() reads back).

A run folder holds train_config.json (the options, with the resolved steps), metrics.jsonl, checkpoints/ and,
when the schedule is complete, what task.save writes and training_curve.png; `inspect_run_dir` decides
whether a folder may be resumed, overwritten or replaced, and the finished folder is put in place at once
(io.publish_dir).

`train(task, config, dist, out, mode, seed) -> Path | None` runs the schedule; `LoopConfig` holds the options
every trainer shares (with `budget_minutes` the length is set by timing real steps on this machine). The loop owns:
AdamW with weight decay by role (`decay_parameter_names`), linear warmup then cosine decay (torch
lr_schedulers), clipping, bf16 autocast on CUDA, DDP, checkpoints (safetensors + JSON, written atomically),
resume to the weights of an uninterrupted run, `stop_after`, SIGINT/SIGTERM -> checkpoint, metrics.jsonl,
training_curve.png and progress (a tqdm bar on a terminal, log lines otherwise).
"""
from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import signal
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch
import torch.nn as nn

from mixret import io
from mixret.autocast import autocast
from mixret.distributed import Distributed
from mixret.errors import MixretError
from mixret.options import option
from mixret.training import checkpoint as ckpt

TRAIN_CONFIG_NAME = "train_config.json"
METRICS_NAME = "metrics.jsonl"
CURVE_NAME = "training_curve.png"
RUN_FILES = (TRAIN_CONFIG_NAME, METRICS_NAME, CURVE_NAME, ckpt.CHECKPOINTS)  # what the loop writes in a run
METRIC_LABELS = {"val_loss": "validation loss"}
BUDGET_WARMUP_STEPS = 4  # steps run, untimed, before the budget's timing: a fresh process's first steps (new batch
                         # shapes, allocations) measured 20-30 % slower than its later ones, which cut budgets short
BUDGET_TIMED_STEPS = 8   # steps timed after them to size a schedule to a time budget: their mean per unit of work,
                         # since batches of different lengths take different times


class Task:
    """What a trainer gives the loop (see the module's docstring). A subclass sets name, unit, objective and
    fingerprint and implements batches, evaluate, save and load; every other hook is a no-op here."""
    name: str
    unit: str
    objective: nn.Module
    fingerprint: str
    metric_keys: tuple[str, ...] = ()     # evaluate() keys present (as None) in every metrics.jsonl line
    files: tuple[str, ...] = ()           # names `save` writes in the output folder
    curve_reference: tuple = ()           # (value, label): a horizontal line on the training curve

    def batches(self, start: int, dist: Distributed, grad_accum: int) -> Iterator[list]:
        raise NotImplementedError

    def evaluate(self) -> dict:
        raise NotImplementedError

    def save(self, directory: Path) -> None:
        raise NotImplementedError

    def load(self, directory: Path) -> None:
        raise NotImplementedError

    def options(self) -> dict:
        """The run's options, saved as train_config.json."""
        return {}

    def prepare(self, directory: Path) -> None:
        """Write what a resumed run needs before the first step (rank 0)."""

    def on_step(self, step: int, loss: torch.Tensor) -> None:
        """After each optimizer step: the step's mean loss (a 0-d tensor)."""

    def finish(self) -> None:
        """After the last step, before the final checkpoint (eval mode)."""

    def start_metrics(self) -> dict:
        """Before the first step of a new run (eval mode, no gradients): the metrics.jsonl line of step 0 (the loss
        before training, say); empty: no such line."""
        return {}

    def record_extra(self, step: int) -> dict:
        """More fields for each metrics.jsonl line (e.g. the epoch)."""
        return {}

    def relative_cost(self, step: int) -> float:
        """The work of step `step` against the mean step (1.0 on average): budget timing divides by it."""
        return 1.0


@dataclass
class LoopConfig:
    """Options of the loop, shared by every trainer (each trainer's config holds one, with its own defaults)."""
    steps: int | None = option(None, "Optimizer steps of the whole schedule (not of this invocation).")
    budget_minutes: float | None = option(
        None, "Schedule length: as many steps as fit this many minutes on this machine, evaluations included "
              "(instead of --steps; the resolved steps are saved with the run).")
    lr: float = option(1e-3, "Peak learning rate (AdamW; warmup, then cosine decay to min_lr_ratio, 0.1, of it).")
    warmup: int | None = option(None, "Linear warmup steps.", show="5% of the steps, at least 1")
    min_lr_ratio: float = option(0.1, "The cosine decay ends at this fraction of --lr.")
    weight_decay: float = option(0.1, "AdamW weight decay, on the weights of Linear layers and mixing matrices (not "
                                      "on biases, norms or embeddings).")
    betas: tuple[float, float] = option((0.9, 0.95), "AdamW betas.", cli=False)
    grad_clip: float = option(1.0, "Gradient norm clipping.")
    grad_accum: int = option(1, "Micro-batches per optimizer step.")
    log_every: int = option(10, "Steps between metrics.jsonl lines.")
    eval_every: int = option(200, "Steps between validations.")
    checkpoint_every: int = option(500, "Steps between checkpoints.")
    stop_after: int | None = option(None, "End this invocation after this many steps, with a checkpoint.")
    compile: bool = option(False, "Run the objective through torch.compile.")
    progress: bool | None = option(None, "A progress bar on a terminal, log lines otherwise; False: quiet.", cli=False)


# --- optimisation -----------------------------------------------------------------------------

def decay_parameter_names(model: nn.Module) -> set[str]:
    """Names of the parameters that get weight decay: the weights of Linear layers and of modules that list
    theirs in a `decayed_parameters` attribute (the masked mixing matrices). Biases, norms, embeddings (a tied
    LM head included) and mixing biases are not decayed."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    chosen: set[int] = set()
    for module in model.modules():
        names = ("weight",) if isinstance(module, nn.Linear) else getattr(module, "decayed_parameters", ())
        for name in names:
            p = getattr(module, name, None)
            if isinstance(p, nn.Parameter) and id(p) not in embeddings:
                chosen.add(id(p))
    return {name for name, p in model.named_parameters() if id(p) in chosen}


def make_optimizer(model: nn.Module, cfg: LoopConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW in two groups: decayed (see decay_parameter_names), then the rest."""
    decayed = decay_parameter_names(model)
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [p for n, p in params if n in decayed], "weight_decay": cfg.weight_decay},
              {"params": [p for n, p in params if n not in decayed], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, fused=device.type == "cuda")


def make_scheduler(optimizer: torch.optim.Optimizer, warmup: int, total: int, min_lr_ratio: float,
                   step: int = 0) -> torch.optim.lr_scheduler.LRScheduler:
    """Linear warmup from lr/(warmup+1) to lr over `warmup` steps, then cosine decay to min_lr_ratio * lr at
    `total`; advanced to `step` (a resumed run continues the schedule it is given now)."""
    for group in optimizer.param_groups:
        group["lr"] = group.setdefault("initial_lr", group["lr"])
    peak = optimizer.param_groups[0]["initial_lr"]
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, total - warmup),
                                                        eta_min=min_lr_ratio * peak)
    if warmup > 0:
        linear = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1 / (warmup + 1), total_iters=warmup)
        scheduler = torch.optim.lr_scheduler.SequentialLR(optimizer, [linear, cosine], milestones=[warmup])
    else:
        scheduler = cosine
    with warnings.catch_warnings():  # stepping the schedule without optimizer steps is what we mean here
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(step):
            scheduler.step()
    return scheduler


def lr_factor(step: int, warmup: int, total: int, min_lr_ratio: float = 0.1) -> float:
    """The schedule's learning rate at `step` as a fraction of the peak (from make_scheduler itself)."""
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    return make_scheduler(optimizer, warmup, total, min_lr_ratio, step).get_last_lr()[0]




def peak_memory_mb(device: torch.device) -> float:
    """Peak GPU memory allocated, or the process's peak resident memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


# --- the run folder -------------------------------------------------------------------------------

def inspect_run_dir(out: Path, options: dict, identity: Sequence[str], resume: bool, overwrite: bool,
                    files: Sequence[str], command: str, replaces: str | None = None) -> str:
    """'fresh', 'resume', 'overwrite' or 'replace' (a finished output of kind `replaces` there is replaced
    when the new one is complete); a MixretError when `out` holds something these options may not touch.
    `identity` names the options a resumed run must keep."""
    if out.exists() and not out.is_dir():
        raise MixretError(f"{out}: exists and is not a directory; expected an output directory")
    present = [name for name in (*RUN_FILES, *files) if (out / name).exists()]
    if not present:
        return "fresh"
    saved_path = out / TRAIN_CONFIG_NAME
    saved = io.read_json(saved_path, "run options") if saved_path.is_file() else None
    diffs = None if saved is None else [f"{k} {saved.get(k)!r} there, {options.get(k)!r} here"
                                        for k in identity if saved.get(k) != options.get(k)]
    if resume:
        if saved is None:
            raise MixretError(f"{out}: holds a model not written by `{command}` (no {TRAIN_CONFIG_NAME}), "
                              "so there is no run to resume; choose another --out, or --overwrite to replace it")
        if diffs:
            raise MixretError(f"{out}: holds a different model ({'; '.join(diffs)}); cannot resume it with these "
                              "options. Drop the differing options to continue it, or choose another --out")
        return "resume"
    if overwrite:
        return "overwrite"
    if replaces is not None and (out / io.CONFIG_NAME).is_file():
        io.check_out_dir(out, io.CONFIG_NAME, replaces, overwrite=True)
        return "replace"
    what = "a different model" if diffs or saved is None else "a model from an earlier run"
    detail = f": {'; '.join(diffs)}" if diffs else f" ({', '.join(present)})"
    raise MixretError(f"{out}: already holds {what}{detail}; pass --resume to continue that run, --overwrite to "
                      "replace it, or choose another --out")


def clear_run_dir(out: Path, names: Sequence[str]) -> None:
    """Delete `names` in `out` (and nothing else)."""
    for name in names:
        p = out / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


class MetricsLog:
    """metrics.jsonl: one JSON object a line, appended and flushed as training goes."""

    def __init__(self, path: Path | None, keep_until: int):
        """Opens the log, keeping only complete lines with step <= keep_until (0: a fresh log); None: no log."""
        self.path = path
        if path is None:
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
        if self.path is not None:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")


def last_metric(run_dir: Path, key: str):
    """The last value of `key` logged in a run folder's metrics.jsonl (None when never logged, or no file)."""
    path = Path(run_dir) / METRICS_NAME
    if not path.is_file():
        return None
    values = [r[key] for r in map(json.loads, path.read_text().splitlines()) if r.get(key) is not None]
    return values[-1] if values else None


def plot_curve(metrics_path: Path, png_path: Path, reference: float | None = None,
               reference_label: str = "reference") -> None:
    """training_curve.png: training loss and the scalar evaluation losses against step (written atomically)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    recs = [json.loads(line) for line in metrics_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    fig = Figure(figsize=(7, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    train = [(r["step"], r["loss"]) for r in recs if r.get("loss") is not None]
    if train:
        ax.plot(*zip(*train), label="train")
    for key in sorted({k for r in recs for k, v in r.items() if k.endswith("loss") and k != "loss"}):
        points = [(r["step"], r[key]) for r in recs if isinstance(r.get(key), (int, float))]
        if points:
            ax.plot(*zip(*points), "o-", label=METRIC_LABELS.get(key, key).replace("_", " "))
    if reference is not None:
        ax.axhline(reference, color="gray", linestyle="--", label=reference_label)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    with io.atomic_path(png_path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)


def flat_scalars(metrics: dict, prefix: str = "") -> dict[str, float]:
    """{"test": {"top1": 0.9}} -> {"test.top1": 0.9}: the numbers of an evaluation, for progress lines."""
    out = {}
    for k, v in metrics.items():
        if isinstance(v, dict):
            out.update(flat_scalars(v, f"{prefix}{k}."))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[f"{prefix}{k}"] = v
    return out


def progress_line(step: int, total: int, record: dict, evaluated: dict, unit: str, elapsed: float,
                  steps_done: int) -> str:
    """'step 20/400: loss 5.1234, validation loss 5.2345, 12,345 tok/s, 1m05s left'."""
    parts = [f"loss {record['loss']:.4f}"] if "loss" in record else []
    parts += [f"{METRIC_LABELS.get(k, k)} {v:.4f}" for k, v in flat_scalars(evaluated).items()]
    rate = f"{unit}_per_s"
    if rate in record:
        parts.append(f"{record[rate]:,} {'tok' if unit == 'tokens' else unit}/s")
    if steps_done and step < total:
        left = round(elapsed / steps_done * (total - step))
        parts.append(f"{left // 3600}h{left // 60 % 60:02d}m left" if left >= 3600
                     else f"{left // 60}m{left % 60:02d}s left")
    return f"step {step}/{total}: " + ", ".join(parts)


class Interrupted(Exception):
    """Training stopped by SIGINT or SIGTERM; a checkpoint was written first."""

    def __init__(self, signum: int, step: int, checkpoint: Path | None):
        where = f"checkpoint: {checkpoint}" if checkpoint is not None else "no checkpoint (no output folder)"
        super().__init__(f"stopped by {signal.Signals(signum).name} at step {step}; {where}")
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


def say(dist: Distributed, message: str) -> None:
    """Print a line on rank 0 (above a progress bar, if one is shown)."""
    if dist.main:
        from tqdm.auto import tqdm
        tqdm.write(message, file=sys.stderr)


# --- the loop -------------------------------------------------------------------------------------

def train(task: Task, cfg: LoopConfig, dist: Distributed, out: Path | None = None, mode: str = "fresh",
          seed: int = 0) -> Path | None:
    """Run the schedule of `task` -> `out` when the schedule is complete, the checkpoint written when
    stop_after ended this invocation early (None without `out`).

    `mode` is what inspect_run_dir found in `out`; with 'resume' training continues from the newest
    checkpoint there. cfg.steps (or cfg.budget_minutes) and cfg.warmup are resolved here, and the resolved
    values are saved with the options. Raises Interrupted after SIGINT/SIGTERM (with a checkpoint when there
    is an `out`).
    """
    return _Loop(task, cfg, dist, out, mode, seed).run()


class _Loop:
    def __init__(self, task: Task, cfg: LoopConfig, dist: Distributed, out: Path | None, mode: str, seed: int):
        if out is None and (mode == "resume" or cfg.stop_after is not None):
            raise MixretError("resume and stop_after need an output folder for checkpoints")
        self.task, self.cfg, self.dist, self.out, self.mode = task, cfg, dist, out, mode
        self.model = task.objective
        self.optimizer = make_optimizer(self.model, cfg, dist.device)
        objective = torch.compile(self.model, dynamic=True) if cfg.compile else self.model
        self.wrapped = objective
        if dist.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP
            self.wrapped = DDP(objective, device_ids=[dist.device.index] if dist.device.type == "cuda" else None)
        self.step = 0
        torch.manual_seed(seed + dist.rank)  # dropout differs between ranks
        resume_from = self.find_checkpoint() if mode == "resume" else None
        if resume_from is not None:
            self.restore(resume_from)
        elif cfg.budget_minutes is not None:
            cfg.steps = self.plan_steps(60 * cfg.budget_minutes)
        if cfg.steps is None:
            raise MixretError("the loop needs steps or budget_minutes")
        if cfg.warmup is None:
            cfg.warmup = max(1, cfg.steps // 20)
        if self.step > cfg.steps:
            raise MixretError(f"{resume_from}: the run is at step {self.step}, beyond steps={cfg.steps}; "
                              f"expected steps >= {self.step}")
        self.scheduler = make_scheduler(self.optimizer, cfg.warmup, cfg.steps, cfg.min_lr_ratio, self.step)
        if resume_from is not None:
            say(dist, f"resuming from {resume_from} (step {self.step} of {cfg.steps})")
        if out is not None:
            dist.on_main(self.prepare_run_dir)

    # -- run folder and checkpoints ------------------------------------------------------------------
    def saved_options(self) -> dict:
        options = dict(self.task.options())
        # the budget is resolved into steps: a resumed run (or a rerun with these steps) has the same schedule
        options.update(steps=self.cfg.steps, warmup=self.cfg.warmup, budget_minutes=None)
        return options

    def prepare_run_dir(self) -> None:
        out = self.out
        if self.mode == "overwrite":
            clear_run_dir(out, (*RUN_FILES, *self.task.files))
        elif self.mode == "replace":
            clear_run_dir(out, RUN_FILES)  # the finished output stays until the new one replaces it
        out.mkdir(parents=True, exist_ok=True)
        ckpt.remove_temporaries(out)
        io.write_json(out / TRAIN_CONFIG_NAME, self.saved_options())
        self.task.prepare(out)

    def find_checkpoint(self) -> Path | None:
        """The newest complete checkpoint of the run being resumed, checked against the data."""
        latest = ckpt.latest_checkpoint(self.out)
        if latest is None:
            say(self.dist, f"{self.out}: no checkpoint yet; starting from step 0")
            return None
        state = io.read_json(latest / ckpt.STATE_NAME, "checkpoint state")
        if state.get("corpus") != self.task.fingerprint:
            raise MixretError(f"{latest}: the corpus has changed since this run started (its text differs); "
                              "expected the same data to resume, or a new run with another --out")
        return latest

    def restore(self, directory: Path) -> None:
        """Continue from a checkpoint: weights, optimizer, RNG states and step. The learning rate, weight
        decay and schedule are the ones given now (they may differ from the run's)."""
        state, opt_tensors, rng = ckpt.read_checkpoint(directory)
        self.task.load(directory)
        self.optimizer.load_state_dict(ckpt.optimizer_from_flat(opt_tensors, state["optimizer"]))
        for group, decay in zip(self.optimizer.param_groups, (self.cfg.weight_decay, 0.0)):
            group.update(initial_lr=self.cfg.lr, lr=self.cfg.lr, weight_decay=decay)
        self.step = state["step"]
        rank, saved_world = self.dist.rank, state.get("world_size", 1)
        mine = {k.split(".", 1)[1]: v for k, v in rng.items() if k.startswith(f"rank{rank}.")}
        if saved_world != self.dist.world_size:
            warnings.warn(
                f"{directory}: written by {saved_world} process(es), resumed by {self.dist.world_size}: the data "
                f"order is kept, but random draws (dropout) will differ from an uninterrupted run: ranks below "
                f"{min(saved_world, self.dist.world_size)} continue their own saved random state"
                + (f", ranks {saved_world} and up start from a fresh seed" if self.dist.world_size > saved_world
                   else f", the saved state of ranks {self.dist.world_size} and up is not used"), stacklevel=2)
        if mine:
            ckpt.set_torch_rng_state(mine, self.dist.device)
        else:
            torch.manual_seed(1_000_003 * self.step + rank)
        ckpt.set_host_rng_state(state["host_rng"])

    def save_checkpoint(self) -> Path:
        """Write a checkpoint of the current step (every rank takes part; rank 0 writes)."""
        rng = {}
        dist = self.dist
        for name, t in ckpt.torch_rng_state(dist.device).items():
            parts = [t]
            if dist.world_size > 1:
                t = t.to(dist.device)
                parts = [torch.empty_like(t) for _ in range(dist.world_size)]
                torch.distributed.all_gather(parts, t)
            rng.update({f"rank{r}.{name}": p.cpu() for r, p in enumerate(parts)})
        state = {"corpus": self.task.fingerprint, "world_size": dist.world_size}
        dist.on_main(lambda: ckpt.save_checkpoint(self.out, self.step, self.task.save, self.optimizer, state, rng))
        return self.out / ckpt.CHECKPOINTS / ckpt.step_dir_name(self.step)

    # -- steps ---------------------------------------------------------------------------------------
    def train_step(self, micro_batches: list) -> torch.Tensor:
        """One optimizer step -> [summed loss, summed weight] of the step over every rank (float64)."""
        dist, last = self.dist, len(micro_batches) - 1
        totals = torch.zeros(2, dtype=torch.float64, device=dist.device)
        for k, batch in enumerate(micro_batches):
            sync = contextlib.nullcontext() if k == last or dist.world_size == 1 else self.wrapped.no_sync()
            with sync:
                with autocast(dist.device):
                    loss, weight = self.wrapped(batch)
                loss.backward()
            totals[0] += loss.detach().double()
            totals[1] += weight
        dist.sum(totals)
        # DDP averaged the gradients of the summed losses over the ranks; this makes them the step's mean
        scale = (dist.world_size / totals[1]).float()
        for p in self.model.parameters():
            if p.grad is not None:
                p.grad.mul_(scale)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.last_lr = self.optimizer.param_groups[0]["lr"]  # the rate this step used
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return totals

    def evaluate(self) -> dict:
        self.model.eval()
        try:
            with torch.no_grad():
                return self.task.evaluate()
        finally:
            self.model.train()

    def plan_steps(self, seconds: float) -> int:
        """Steps whose training and evaluations take about `seconds` here, timed on real batches; the
        weights, optimizer and random state are restored afterwards, so the run is the one it would be
        with --steps set to the result."""
        dist, cfg = self.dist, self.cfg
        weights = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        rng = ckpt.torch_rng_state(dist.device)
        host = ckpt.host_rng_state()
        real_optimizer = self.optimizer
        self.optimizer = make_optimizer(self.model, cfg, dist.device)
        self.scheduler = make_scheduler(self.optimizer, 0, 1, 1.0)
        self.model.train()
        try:
            batches = self.task.batches(0, dist, cfg.grad_accum)
            times = []
            for _ in range(BUDGET_WARMUP_STEPS + BUDGET_TIMED_STEPS):
                start = time.perf_counter()
                self.train_step(next(batches))
                if dist.device.type == "cuda":
                    torch.cuda.synchronize(dist.device)
                times.append(time.perf_counter() - start)
            start = time.perf_counter()
            self.evaluate()
            eval_seconds = time.perf_counter() - start
        finally:
            self.model.load_state_dict(weights)
            self.optimizer = real_optimizer
            self.model.zero_grad(set_to_none=True)
            ckpt.set_torch_rng_state(rng, dist.device)
            ckpt.set_host_rng_state(host)
        # steps of different sizes (batches grouped by length): time per unit of work, times the mean step's work
        timed = range(BUDGET_WARMUP_STEPS, BUDGET_WARMUP_STEPS + BUDGET_TIMED_STEPS)
        step_mean = sum(times[i] for i in timed) / sum(self.task.relative_cost(s) for s in timed)
        timing = dist.max(torch.tensor([step_mean, eval_seconds], dtype=torch.float64, device=dist.device))
        step_s, eval_s = float(timing[0]), float(timing[1])
        steps = max(1, int((seconds - eval_s) / (step_s + eval_s / cfg.eval_every)))
        say(dist, f"budget: {seconds / 60:g} min at {step_s:.3g} s a step and {eval_s:.3g} s an evaluation "
                  f"-> {steps:,} steps (saved as steps={steps}; rerun with --steps {steps} for the same run)")
        return steps

    def stop_requested(self, received: list[int]) -> int:
        """The signal asking to stop, 0 if none; every rank gets the same answer."""
        if self.dist.world_size == 1:
            return received[0] if received else 0
        flag = torch.tensor([received[0] if received else 0], device=self.dist.device)
        return int(self.dist.max(flag))

    # -- the loop ------------------------------------------------------------------------------------
    def run(self) -> Path | None:
        from tqdm.auto import tqdm

        cfg, dist, task = self.cfg, self.dist, self.task
        keys = {k: None for k in task.metric_keys}
        rate_key = f"{task.unit}_per_s"
        metrics = MetricsLog(self.out / METRICS_NAME if self.out is not None and dist.main else None,
                             keep_until=self.step)
        start_step, evaluated, postfix = self.step, None, {}
        window = torch.zeros(2, dtype=torch.float64, device=dist.device)  # [loss sum, weight] since the last log
        window_start, paused = time.perf_counter(), 0.0  # paused: time spent evaluating and checkpointing
        disable = (None if cfg.progress is None else not cfg.progress) if dist.main else True
        bar = tqdm(total=cfg.steps, initial=self.step, unit="step", desc=task.name, disable=disable,
                   dynamic_ncols=True, file=sys.stderr)
        run_start = time.perf_counter()
        if self.step == 0:
            self.model.eval()
            with torch.no_grad():
                record = task.start_metrics()
            if record:
                metrics.write({"step": 0, **keys, **record})
                say(dist, "step 0 (before training): " + ", ".join(f"{k} {v:.4g}" for k, v in record.items()))
        self.model.train()
        batches = task.batches(self.step, dist, cfg.grad_accum)
        with stop_signals() as received:
            while self.step < cfg.steps:
                totals = self.train_step(next(batches))
                self.step += 1
                window += totals
                task.on_step(self.step, (totals[0] / totals[1]).float())
                bar.update(1)
                step, record = self.step, {}
                if step % cfg.log_every == 0 or step == cfg.steps:
                    loss, weight = (window[0] / window[1]).item(), window[1].item()
                    seconds = time.perf_counter() - window_start - paused
                    record.update(loss=round(loss, 5), lr=self.last_lr,
                                  **{rate_key: round(weight / max(seconds, 1e-9))},
                                  peak_mem_mb=round(peak_memory_mb(dist.device), 1))
                    postfix.update(loss=f"{loss:.3f}")
                    window.zero_()
                    window_start, paused = time.perf_counter(), 0.0
                t0 = time.perf_counter()
                if step % cfg.eval_every == 0 or step == cfg.steps:
                    evaluated = self.evaluate()
                    record.update(evaluated)
                    postfix.update({k: f"{v:.3f}" for k, v in list(flat_scalars(evaluated).items())[:2]})
                if record:
                    metrics.write({"step": step, **task.record_extra(step), **keys,
                                   **record})
                    bar.set_postfix(postfix, refresh=False)
                    if cfg.progress is not False and (bar.disable or step % cfg.eval_every == 0
                                                      or step == cfg.steps):
                        shown = evaluated if step % cfg.eval_every == 0 or step == cfg.steps else {}
                        say(dist, progress_line(step, cfg.steps, record, shown, task.unit,
                                                time.perf_counter() - run_start, step - start_step))
                if self.out is not None and step % cfg.checkpoint_every == 0 and step < cfg.steps:
                    self.save_checkpoint()
                paused += time.perf_counter() - t0
                signum = self.stop_requested(received)
                if signum:
                    bar.close()
                    raise Interrupted(signum, step, self.save_checkpoint() if self.out is not None else None)
                if cfg.stop_after is not None and step - start_step >= cfg.stop_after and step < cfg.steps:
                    bar.close()
                    path = self.save_checkpoint()
                    say(dist, f"stopped after {cfg.stop_after} steps, at step {step} of {cfg.steps}; "
                              f"checkpoint written to {path}")
                    return path
            bar.close()
        if evaluated is None:  # resumed at the end of the schedule: nothing was trained this time
            evaluated = self.evaluate()
        self.model.eval()
        with torch.no_grad():
            task.finish()
        self.model.train()
        if self.out is None:
            return None
        self.save_checkpoint()
        dist.on_main(self.publish)
        return self.out

    def publish(self) -> None:
        """Write the task's output beside the run's records and put the whole folder in place at once."""
        out = self.out
        if (out / METRICS_NAME).is_file() and (out / METRICS_NAME).stat().st_size:
            plot_curve(out / METRICS_NAME, out / CURVE_NAME, *self.task.curve_reference)
        tmp = io.temp_dir(out.parent, out.name)
        try:
            self.task.save(tmp)
            for entry in out.iterdir():
                if not (tmp / entry.name).exists() and not entry.name.startswith("."):
                    os.replace(entry, tmp / entry.name)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        io.publish_dir(tmp, out)
