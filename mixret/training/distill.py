"""Distillation: a mixret model trained to reproduce a sentence-transformers teacher's embeddings of texts.

    from mixret.training.pretrain import TrainConfig, pretrain
    out = pretrain(TrainConfig(objective="distill", teacher="all-MiniLM-L6-v2", data=["texts.jsonl"],
                               budget_minutes=4))          # `mixret distill` on the command line

The third objective of the text-only task (`mixret.training.text_task.TextTask`): the corpus, tokenizer, model,
batches by
(seed, step), run folder, resume and torchrun are those of `pretrain`. Before training (and before a time budget
is sized) the teacher embeds every text of the corpus once; the embeddings are cached on disk under
$MIXRET_CACHE/teacher (npy + JSON, no pickle), keyed by the teacher's identity (its name or resolved path and a
hash of its weights and module stack) and a hash of the texts, so the next run on the same texts with the same
teacher reuses them and a cache entry of another teacher or other texts is never read.

The student's embedding is the one `encode` computes (`mixret.models.encode.pool` of the model inputs that encode
builds, with the run's pooling). Student and teacher widths differ, so the loss compares them through a learned
isometry: a linear map with orthonormal columns (torch's orthogonal parametrization) from the narrower space into
the wider one. An isometry keeps lengths and angles, so the student's cosines between its own embeddings are
exactly those of the mapped ones: what is learned about the teacher's geometry lives in the student's own space,
and the saved model embeds without the map. The map is kept beside the model (distill_projection.safetensors)
only to continue a run and to compare with the teacher; nothing that embeds reads it. A plain learned linear map
would let the student's own geometry drift from what the teacher's loss sees (a non-orthogonal map stretches some
directions), which is why it is constrained.

Loss per text: "cosine" (1 - cosine of the mapped student and teacher embeddings, the default) or "mse" (squared
distance). On the planted texts of tests/test_distill.py (a masked mixer d64 x 2 taught by a one-layer BERT of
width 32) they were alike: held-out cosine 0.985 with either after 300 steps of 32 texts, 0.89 (cosine) and 0.90
(mse) after 100; docs/bench/distill.md compares them on real texts with all-MiniLM-L6-v2. Cosine is the default:
it does not depend on the scale of the teacher's vectors. With `pairs`,
the training split of a pairs file (split_pairs' test split is never read) adds in-batch InfoNCE: each
micro-batch draws as many distinct pairs as it has texts, from a generator seeded by (seed, step, micro-batch).

Validation, on the held-out texts: `val_cos`, the mean cosine of the mapped student embedding with the teacher's,
and `val_nn_agree`, the fraction of held-out texts whose nearest other held-out text by the student's own
embedding is the teacher's nearest one. The LM head plays no part and is frozen (unless tied to the input
embeddings), so every trained parameter gets a gradient, as DDP requires. The saved model records its pooling,
max_length and what trained it (the texts, and the pairs' training split), so `embed`, `index`, `search`,
`evaluate`, `serve` and `finetune` use it as they use any other.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from mixret import io
from mixret.data import BUNDLED_TEST_FRACTION, load_pairs, sources_record, split_pairs
from mixret.errors import MixretError
from mixret.models.encode import embed_sequences, pad_sequences, pool, token_sequences
from mixret.training.finetune import distinct_pairs
from mixret.training.spans import SpanTask
from mixret.training.text_task import TextTask
from mixret.training.train_data import cache_root

PROJECTION_NAME = "distill_projection.safetensors"
CACHE_FORMAT = 1          # bump when what a cache entry holds changes
PAIRS_KEY = 2**61         # the generator key of the pairs of a micro-batch: apart from every other draw
TEACHER_BATCH = 64        # texts per teacher forward pass




# --- the teacher ------------------------------------------------------------------------------

@dataclass
class Teacher:
    source: str       # the name given, or the resolved folder
    digest: str       # hash of the weights and module stack
    model: object     # a SentenceTransformer


def load_teacher(name_or_path: str, device: torch.device | str = "cpu") -> Teacher:
    """A sentence-transformers model by hub name or folder, with its identity."""
    try:  # deferred: sentence-transformers is the optional extra "st", needed only here and by the baseline
        from sentence_transformers import SentenceTransformer
    except ImportError:
        raise MixretError("distillation needs sentence-transformers: pip install 'mixret[st]'") from None
    local = Path(name_or_path).expanduser()
    source = str(local.resolve()) if local.exists() else name_or_path
    try:
        model = SentenceTransformer(source, device=str(device))
    except Exception as e:  # missing folder, no network for a hub name, a folder of another kind
        raise MixretError(f"{name_or_path}: cannot load it as a sentence-transformers model ({type(e).__name__}: "
                          f"{e}); expected a model folder or a name on the Hugging Face hub") from None
    model.eval()
    return Teacher(source, teacher_digest(model), model)


def teacher_digest(model: nn.Module) -> str:
    """blake2b of the module stack (its repr: transformer, pooling, normalisation, max_seq_length) and of every
    tensor of the state dict (name, dtype, shape, bytes)."""
    h = hashlib.blake2b(repr(model).encode(), digest_size=16)
    for name, t in sorted(model.state_dict().items()):
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def teacher_cache_dir() -> Path:
    return cache_root() / "teacher"


def teacher_embeddings(teacher: Teacher, texts: Callable[[], list[str]], count: int, texts_hash: str,
                       say: Callable[[str], None] = print) -> np.ndarray:
    """The teacher's embeddings [count, D] of the texts (called only when they are not cached), float32: from
    the cache when an entry of this teacher and these texts is there, else computed and cached."""
    meta = {"format": CACHE_FORMAT, "teacher": teacher.source, "teacher_digest": teacher.digest,
            "texts": texts_hash, "count": count}
    key = hashlib.blake2b("|".join(str(v) for v in meta.values()).encode(), digest_size=16).hexdigest()
    path = teacher_cache_dir() / f"{key}.npy"
    cached = read_cached(path, meta, say)
    if cached is not None:
        say(f"teacher: {count:,} embeddings of {teacher.source} reused from {path}")
        return cached
    say(f"teacher: embedding {count:,} texts with {teacher.source} (once; cached in {path})")
    E = np.asarray(teacher.model.encode(texts(), batch_size=TEACHER_BATCH, convert_to_numpy=True,
                                        show_progress_bar=False), dtype=np.float32)
    if E.ndim != 2 or len(E) != count:
        raise MixretError(f"{teacher.source}: the teacher gave embeddings of shape {E.shape} for {count} texts; "
                          f"expected one vector per text")
    with io.atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, E, allow_pickle=False)
    io.write_json(path.with_suffix(".json"), {**meta, "dim": int(E.shape[1])})
    return E


def read_cached(path: Path, meta: dict, say: Callable[[str], None]) -> np.ndarray | None:
    """A cache entry whose record names this teacher and these texts, else None (an entry that does not match,
    as from a hash collision or an edited file, is reported and recomputed)."""
    record_path = path.with_suffix(".json")
    if not (path.is_file() and record_path.is_file()):
        return None
    record = io.read_json(record_path, "teacher cache record")
    if {k: record.get(k) for k in meta} != meta:
        say(f"teacher: {record_path} was made by another teacher or from other texts; computing anew")
        return None
    E = np.load(path, allow_pickle=False)
    if E.ndim != 2 or len(E) != meta["count"] or E.shape[1] != record.get("dim"):
        say(f"teacher: {path} holds {E.shape}, not {meta['count']} embeddings; computing anew")
        return None
    return E.astype(np.float32, copy=False)


# --- the objective ------------------------------------------------------------------------------

class Isometry(nn.Module):
    """A learned linear map with orthonormal columns from d_in into d_out >= d_in dimensions: lengths and angles
    are kept."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.map = nn.utils.parametrizations.orthogonal(nn.Linear(d_in, d_out, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.map(x)


def common_space(project: Isometry, student_side: bool, student: torch.Tensor,
                 teacher: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Student [B, d] and teacher [B, D] embeddings in the wider of the two spaces."""
    return (project(student), teacher) if student_side else (student, project(teacher))


class DistillLoss(nn.Module):
    """The student, the isometry between its space and the teacher's, and the loss (summed over the batch)."""

    def __init__(self, lm: nn.Module, d_teacher: int, pooling: str, loss: str, temperature: float):
        super().__init__()
        self.lm, self.pooling, self.loss, self.temperature = lm, pooling, loss, temperature
        d = lm.config.d_model
        self.student_side = d <= d_teacher           # the narrower side is mapped into the wider space
        self.project = Isometry(min(d, d_teacher), max(d, d_teacher))

    def common(self, student: torch.Tensor, teacher: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return common_space(self.project, self.student_side, student, teacher)

    def distance(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:  # -> [B]
        a, b = self.common(student, teacher)
        if self.loss == "mse":
            return (a - b).pow(2).sum(-1)
        return 1 - F.cosine_similarity(a, b, dim=-1)

    def forward(self, batch) -> tuple[torch.Tensor, int]:
        """batch = (ids, mask [B, L], teacher embeddings [B, D]) and, with pairs, (query ids, query mask, document
        ids, document mask) -> (summed loss, B)."""
        ids, mask, target, *pairs = batch
        loss = self.distance(pool(self.lm, ids, mask, self.pooling), target).sum()
        if pairs:
            q_ids, q_mask, d_ids, d_mask = pairs
            q = F.normalize(pool(self.lm, q_ids, q_mask, self.pooling), dim=-1)
            d = F.normalize(pool(self.lm, d_ids, d_mask, self.pooling), dim=-1)
            logits = q @ d.T / self.temperature
            gold = torch.arange(len(q), device=q.device)
            loss = loss + (F.cross_entropy(logits, gold, reduction="sum")
                           + F.cross_entropy(logits.T, gold, reduction="sum")) / 2
        return loss, len(ids)


def save_projection(objective: DistillLoss, directory: Path) -> None:
    tensors = {k: v.detach().cpu().contiguous() for k, v in objective.project.state_dict().items()}
    with io.atomic_path(Path(directory) / PROJECTION_NAME) as tmp:
        save_file(tensors, tmp, metadata={"student_side": str(objective.student_side)})


def teacher_space(directory: str | Path, student: np.ndarray, teacher: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Student [N, d] and teacher [N, D] embeddings in a common space, through the isometry a distillation saved
    in `directory` (to compare a student with its teacher; nothing that embeds needs it)."""
    from safetensors import safe_open

    path = Path(directory) / PROJECTION_NAME
    if not path.is_file():
        raise MixretError(f"{path}: not found; expected the folder of a distillation run")
    with safe_open(str(path), framework="pt") as f:
        student_side = f.metadata()["student_side"] == "True"
    state = load_file(str(path))
    d_out, d_in = state["map.parametrizations.weight.original"].shape
    project = Isometry(d_in, d_out)
    project.load_state_dict(state)
    with torch.no_grad():
        a, b = common_space(project, student_side, torch.as_tensor(student, dtype=torch.float32),
                            torch.as_tensor(teacher, dtype=torch.float32))
    return a.numpy(), b.numpy()


# --- the task -----------------------------------------------------------------------------------

class DistillTask(SpanTask):
    """The text-only task with a teacher's embedding of each text as the target (SpanTask gives the model inputs
    that encode builds)."""
    name = "distill"
    unit = "texts"
    metric_keys = ("val_cos", "val_nn_agree")

    def load_data(self) -> None:

        TextTask.load_data(self)                  # every document keeps its index: the teacher's rows follow it
        self.set_inputs()
        self.texts_hash = self.fingerprint
        self.load_teacher()
        self.pairs = None
        if self.cfg.pairs is not None:
            self.load_pairs()
            self.trained_on = self.trained_on + sources_record([self.cfg.pairs], BUNDLED_TEST_FRACTION)
        h = hashlib.blake2b(f"{self.texts_hash}|{self.teacher_source}|{self.teacher_digest}|"
                            f"{self.pairs_hash if self.pairs else ''}".encode(), digest_size=16)
        self.fingerprint = h.hexdigest()           # a resumed run must see the same texts, teacher and pairs

    def load_teacher(self) -> None:
        dist = self.dist
        teacher = load_teacher(self.cfg.teacher, dist.device)
        texts = lambda: self.column.to_pylist()  # noqa: E731
        if dist.local_rank != 0:  # one process per machine runs the teacher; the others then read its cache
            dist.barrier()
        E = teacher_embeddings(teacher, texts, self.n_docs, self.texts_hash, self.say)
        if dist.local_rank == 0:
            dist.barrier()
        self.teacher_source, self.teacher_digest = teacher.source, teacher.digest
        self.teacher_train = torch.from_numpy(E[self.train_doc_ids])
        self.teacher_val = torch.from_numpy(E[self.val_doc_ids])
        del teacher

    def load_pairs(self) -> None:

        cfg = self.cfg
        train, _ = split_pairs(load_pairs(cfg.pairs, cfg.query_field, cfg.target_field), BUNDLED_TEST_FRACTION)
        train, _ = distinct_pairs(train)
        if len(train) < cfg.batch_size:
            raise MixretError(f"{cfg.pairs}: {len(train)} distinct training pairs; expected at least batch_size "
                              f"({cfg.batch_size}) for in-batch InfoNCE")
        self.pairs = [token_sequences(self.tokenizer, texts, cfg.model.context, cfg.pooling)[0]
                      for texts in ([p.query for p in train], [p.target for p in train])]
        self.pairs_hash = io.file_hash(cfg.pairs)

    def make_objective(self) -> DistillLoss:
        cfg = self.cfg
        self.model.embedding_defaults = {"pooling": cfg.pooling, "max_length": cfg.model.context}
        self.model.freeze_lm_head()
        self.val_texts = [self.text(self.content(self.val_seqs, i)) for i in range(len(self.val_seqs))]
        self.last_metrics: dict = {}
        return DistillLoss(self.model, self.teacher_train.shape[1], cfg.pooling, cfg.distill_loss,
                           cfg.temperature).to(self.dist.device)

    def micro_batch(self, idx: np.ndarray, step: int, j: int) -> tuple:
        """Training documents idx [B] -> (ids, mask, teacher embeddings [B, D]) and, with pairs, B pairs drawn by
        (seed, step, j): (query ids, query mask, document ids, document mask)."""
        ids, mask = pad_sequences([self.text(self.content(self.train_seqs, i)) for i in idx], self.tokenizer.pad_id)
        batch = [ids, mask, self.teacher_train[idx]]
        if self.pairs is not None:
            rows = np.random.default_rng([self.cfg.seed, step, j, PAIRS_KEY]).choice(
                len(self.pairs[0]), size=len(idx), replace=False)
            for seqs in self.pairs:
                batch.extend(pad_sequences([seqs[r] for r in rows], self.tokenizer.pad_id))
        return tuple(t.to(self.dist.device) for t in batch)

    def evaluate(self) -> dict:
        """Mean cosine with the teacher on the held-out texts, and how often the student's own nearest neighbour
        among them is the teacher's."""
        s = embed_sequences(self.model, self.val_texts, 64, self.cfg.pooling, self.tokenizer.pad_id, self.dist.device)
        t = self.teacher_val
        a, b = self.objective.common(s.to(self.dist.device), t.to(self.dist.device))
        metrics = {"val_cos": round(float(F.cosine_similarity(a, b, dim=-1).mean()), 5),
                   "val_nn_agree": round(nn_agreement(s, t), 5)}
        self.last_metrics = metrics
        return metrics

    def save(self, directory: Path) -> None:
        super().save(directory)
        save_projection(self.objective, directory)

    def load(self, directory: Path) -> None:
        super().load(directory)
        path = Path(directory) / PROJECTION_NAME
        if not path.is_file():
            raise MixretError(f"{path}: not found; expected the isometry saved with every distillation checkpoint")
        self.objective.project.load_state_dict(load_file(str(path)))

    def describe_objective(self) -> str:
        cfg, n = self.cfg, len(self.val_texts)
        pairs = f", plus in-batch InfoNCE on {len(self.pairs[0]):,} training pairs of {cfg.pairs}" if self.pairs else ""
        return (f"the embeddings of teacher {self.teacher_source} ({self.teacher_train.shape[1]} dimensions), "
                f"{cfg.distill_loss} loss through a learned isometry, pooling {cfg.pooling}{pairs}; validation: "
                f"{n:,} held-out texts")

    def result(self) -> str:
        m = self.last_metrics
        return (f"on {len(self.val_texts):,} held-out texts: cosine with the teacher {m['val_cos']:.3f}, own nearest "
                f"neighbour the teacher's for {m['val_nn_agree']:.1%}")

    files = (*TextTask.files, PROJECTION_NAME)


def nn_agreement(student: torch.Tensor, teacher: torch.Tensor) -> float:
    """The fraction of rows whose nearest other row by cosine is the same for both embeddings [N, *] (N >= 2)."""
    def nearest(e):
        e = F.normalize(e.float(), dim=-1)
        sim = e @ e.T
        sim.fill_diagonal_(float("-inf"))
        return sim.argmax(1)
    return float((nearest(student.cpu()) == nearest(teacher.cpu())).double().mean())
