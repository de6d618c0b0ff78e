"""`mixret distill`: a student that reproduces a tiny local sentence-transformers teacher on a planted corpus,
teacher embeddings cached by teacher and texts, resume after SIGTERM equal to an uninterrupted run, the model
folder the other commands read, options."""
import json
import shutil
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from close import assert_close
from interrupt import python_script, sigterm_after
from planted import FILLER, planted_documents, planted_pairs
from safetensors.torch import load_file

import mixret
from mixret.cli import main
from mixret.data import write_pairs_jsonl
from mixret.errors import MixretError
from mixret.models.encode import encode
from mixret.training.distill import PROJECTION_NAME, load_teacher, teacher_embeddings, teacher_space
from mixret.training.pretrain import TrainConfig, pretrain

pytest.importorskip("sentence_transformers")
from st_models import tiny_st_model  # noqa: E402

N_TRAIN = 200  # of the 276 planted documents and queries; the rest are held out


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MIXRET_CACHE", str(tmp_path / "cache"))


def texts() -> tuple[list[str], list[str]]:
    return planted_documents(), [p.query for p in planted_pairs()]


def teacher(tmp_path: Path, seed: int = 0, hidden: int = 32) -> Path:
    """A one-layer BERT teacher that tells texts apart by their rare words (the filler words are silent)."""
    docs, queries = texts()
    return tiny_st_model(tmp_path / f"teacher-{seed}-{hidden}", docs + queries, seed=seed, hidden=hidden,
                         silent=tuple(FILLER))


def corpus(tmp_path: Path) -> Path:
    """The planted training texts: 200 documents and 200 queries, one a line."""
    docs, queries = texts()
    path = tmp_path / "texts.txt"
    path.write_text("\n".join(docs[:N_TRAIN] + queries[:N_TRAIN]) + "\n", encoding="utf-8")
    return path


def tiny(tmp_path: Path, teacher_dir: Path, **kw) -> TrainConfig:
    opts = dict(objective="distill", teacher=str(teacher_dir), data=[str(corpus(tmp_path))], tokenizer="bpe",
                vocab_size=300, d_model=64, layers=2, context=48, steps=300, lr=3e-3, log_every=10, eval_every=100,
                out=str(tmp_path / "run"))
    return TrainConfig(**{**opts, **kw})


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def top1(queries: np.ndarray, docs: np.ndarray) -> np.ndarray:
    """Each query's best document by cosine."""
    q, d = (x / np.linalg.norm(x, axis=1, keepdims=True) for x in (queries, docs))
    return (q @ d.T).argmax(1)


def test_the_student_reproduces_the_teacher_on_held_out_texts(tmp_path):
    from sentence_transformers import SentenceTransformer

    teacher_dir = teacher(tmp_path)
    out = pretrain(tiny(tmp_path, teacher_dir))
    student, st = mixret.load(out), SentenceTransformer(str(teacher_dir), device="cpu")
    docs, queries = texts()
    held_docs, held_queries = docs[N_TRAIN:], queries[N_TRAIN:]          # never trained on
    s, t = encode(student, held_docs + held_queries), st.encode(held_docs + held_queries)
    a, b = teacher_space(out, s, t)
    assert cosines(a, b).mean() > 0.9                                    # (0.985 when written)
    # earned: the teacher's embeddings are spread, so a constant (their mean) is far from them
    assert cosines(t, np.broadcast_to(t.mean(0), t.shape)).mean() < 0.5
    # the student's own embedding (no isometry) ranks the held-out documents for the planted queries as the
    # teacher does: query i's document is document i
    n = len(held_docs)
    teacher_top, student_top = top1(t[n:], t[:n]), top1(s[n:], s[:n])
    assert (teacher_top == np.arange(n)).mean() == 1.0
    assert (student_top == teacher_top).mean() >= 0.95                   # (1.0 when written)
    # learned, not given by the init: an untrained student of the same config ranks at chance
    untrained = mixret.build_model(student.config)
    untrained.tokenizer, untrained.embedding_defaults = student.tokenizer, student.embedding_defaults
    u = encode(untrained, held_docs + held_queries)
    assert (top1(u[n:], u[:n]) == teacher_top).mean() < 0.3
    # an ordinary model folder: its embedding and its data recorded
    assert student.embedding_defaults == {"pooling": "last", "max_length": 48}
    assert [r["source"] for r in student.trained_on] == [str(corpus(tmp_path).resolve())]
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert recs[-1]["val_cos"] > 0.9 and recs[-1]["val_nn_agree"] >= 0.5 and "texts_per_s" in recs[0]
    saved = json.loads((out / "train_config.json").read_text())
    assert saved["objective"] == "distill" and saved["teacher"] == str(teacher_dir.resolve())


def test_cached_teacher_embeddings_are_never_those_of_another_teacher_or_other_texts(tmp_path):
    docs, queries = texts()
    told = []
    embed = lambda tch, xs, h: teacher_embeddings(tch, lambda: xs, len(xs), h, told.append)  # noqa: E731
    a, b = load_teacher(str(teacher(tmp_path, seed=0))), load_teacher(str(teacher(tmp_path, seed=1)))
    first = embed(a, docs, "docs")
    assert np.allclose(first, a.model.encode(docs)) and "embedding 276 texts" in told[-1]
    assert np.array_equal(embed(a, docs, "docs"), first) and "reused" in told[-1]      # the same: reused
    other_teacher = embed(b, docs, "docs")                                                # another teacher
    assert "embedding" in told[-1] and np.allclose(other_teacher, b.model.encode(docs))
    assert not np.allclose(other_teacher, first, atol=1e-2)
    other_texts = embed(a, queries, "queries")                                            # other texts
    assert "embedding" in told[-1] and np.allclose(other_texts, a.model.encode(queries))
    # the same folder with other weights is another teacher
    folder = teacher(tmp_path, seed=0)
    st = a.model
    with torch.no_grad():
        st[0].auto_model.embeddings.word_embeddings.weight.add_(0.05 * torch.randn_like(st[0].auto_model.embeddings.word_embeddings.weight))
    st.save(str(folder))
    changed = load_teacher(str(folder))
    assert changed.source == a.source and changed.digest != a.digest
    assert not np.allclose(embed(changed, docs, "docs"), first, atol=1e-3) and "embedding" in told[-1]
    # an entry put under another's key (a collision, an edited file) is recognised by its record and not read
    cache = tmp_path / "cache" / "teacher"
    records = {json.loads(p.read_text())["teacher_digest"]: p for p in cache.glob("*.json")}
    own, foreign = records[b.digest], records[a.digest]
    shutil.copy(foreign, own)
    shutil.copy(foreign.with_suffix(".npy"), own.with_suffix(".npy"))
    assert np.allclose(embed(b, docs, "docs"), other_teacher) and "another teacher" in told[-2]


def test_distill_resumed_after_sigterm_gives_the_weights_of_an_uninterrupted_run(tmp_path):
    # a teacher wider than the student (the student's side is mapped), pairs (their draws continue), dropout (the
    # random state is restored)
    teacher_dir = teacher(tmp_path, hidden=96)
    pairs = tmp_path / "pairs.jsonl"
    write_pairs_jsonl(planted_pairs(), pairs)
    opts = dict(steps=60, batch_size=8, dropout=0.1, pairs=str(pairs), eval_every=20, checkpoint_every=1000,
                log_every=1)
    whole = pretrain(tiny(tmp_path, teacher_dir, out=str(tmp_path / "whole"), **opts))
    run = tmp_path / "run"
    script = textwrap.dedent(f"""
        import json, time
        from mixret.training import distill
        from mixret.training.pretrain import TrainConfig, pretrain
        slow = distill.DistillTask.micro_batch
        distill.DistillTask.micro_batch = lambda self, *a: (time.sleep(0.05), slow(self, *a))[1]
        pretrain(TrainConfig.from_dict(json.loads({json.dumps(tiny(tmp_path, teacher_dir, out=str(run), **opts).to_dict())!r})))
    """)
    returncode, err = sigterm_after(python_script(script), run, lines=3, env={"MIXRET_CACHE": str(tmp_path / "cache")})
    assert returncode != 0 and "stopped by SIGTERM" in err, err
    assert "reused" in err                                   # the teacher ran once, for the uninterrupted run
    assert not (run / "model.safetensors").exists()
    resumed = pretrain(tiny(tmp_path, teacher_dir, out=str(run), resume=True, **opts))
    for name in ("model.safetensors", PROJECTION_NAME):
        a, b = load_file(str(whole / name)), load_file(str(resumed / name))
        assert a.keys() == b.keys()
        for k in a:
            assert_close(b[k], a[k], rtol=1e-5, name=k)
    model = mixret.load(resumed)
    assert [(r["source"], r["split"]) for r in model.trained_on] == [
        (str(corpus(tmp_path).resolve()), "all"), (str(pairs.resolve()), "train")]


def test_distill_options_are_checked(tmp_path):
    with pytest.raises(MixretError, match="distill needs a teacher"):
        TrainConfig(objective="distill").validate()
    with pytest.raises(MixretError, match="unknown distill loss 'l1'; expected one of cosine, mse"):
        TrainConfig(objective="distill", teacher="t", distill_loss="l1").validate()
    with pytest.raises(MixretError, match="option teacher applies to objective 'distill', not 'spans'"):
        TrainConfig(objective="spans", teacher="t").validate()
    with pytest.raises(MixretError, match="no config.json there; expected a mixret model folder"):
        TrainConfig(objective="distill", teacher="t", init=str(tmp_path)).validate()
    with pytest.raises(MixretError, match="cannot load it as a sentence-transformers model"):
        load_teacher(str(tmp_path / "missing-teacher-folder"))
    result = CliRunner().invoke(main, ["distill", "--texts", str(corpus(tmp_path))])
    assert result.exit_code == 1 and "distill needs a teacher" in result.output
    help_text = " ".join(CliRunner().invoke(main, ["distill", "--help"], terminal_width=200).output.split())
    for flag in ("--teacher", "--texts", "--field", "--pairs", "--model", "--loss", "--budget-minutes", "--resume"):
        assert f"{flag} " in help_text
    assert "cached under $MIXRET_CACHE/teacher" in help_text and "[default: cosine]" in help_text


def test_distill_from_a_model_folder_keeps_its_tokenizer_and_size(tmp_path):
    teacher_dir = teacher(tmp_path)
    start = pretrain(TrainConfig(data=[str(corpus(tmp_path))], tokenizer="bytes", d_model=32, layers=1, context=40,
                                 steps=2, out=str(tmp_path / "clm")))
    result = CliRunner().invoke(main, list(map(str, [
        "distill", "--teacher", teacher_dir, "--texts", corpus(tmp_path), "--model", start, "--steps", 3,
        "--batch-size", 8, "--out", tmp_path / "student"])))
    assert result.exit_code == 0, result.output
    student = mixret.load(tmp_path / "student")
    assert (student.config.d_model, student.config.context, student.tokenizer.kind) == (32, 40, "bytes")
    assert student.pool_head is not None                       # a language model's last position gets the head
    assert len(student.trained_on) == 2 and student.embedding_defaults["pooling"] == "last"
