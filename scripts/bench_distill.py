"""Distillation: mixret students of a sentence-transformers teacher at equal wall-clock, against the teacher.

    python scripts/bench_distill.py --teacher DIR_OR_NAME [--out docs/bench/] [--train-pairs 2000] [--test-pairs 800]
                                    [--minutes 2] [--variants masked-mixer:cosine,llama:cosine,masked-mixer:mse]
                                    [--d-model 128] [--layers 2] [--context 128] [--threads 2] [--quick]

The texts are the summaries and documents of the first --train-pairs pairs of the bundled training split (used as
plain texts, no pairs). The teacher embeds them once (timed; cached for every student). Each variant
(architecture:loss) is a student of the same width, depth and context distilled for --minutes on --threads threads
(`mixret distill`'s defaults otherwise), one after the other. Scored on the first --test-pairs pairs of the bundled
test split: vector R@1, fusion R@1 with the default BM25 (the fusion weight fitted on the 300 training pairs after
the ones whose texts were distilled) and BM25 alone, pessimistic ties; documents embedded per second on the same
threads; the held-out cosine with the teacher (val_cos) from each run. Writes OUT/distill.md and OUT/distill.json.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import bench_common as bc

FUSION_PAIRS = 300


def write_texts(path: Path, pairs) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for p in pairs for t in (p.query, p.target)))
    return path


def teacher_pass(args, texts: Path) -> dict:
    """The teacher's embeddings of the training texts, computed (and cached) once, timed."""
    from mixret.data import load_texts
    from mixret.training.distill import load_teacher, teacher_embeddings
    from mixret.training.train_data import corpus_fingerprint

    column = load_texts([str(texts)], "text").data.column("text")
    teacher = load_teacher(args.teacher)
    start = time.perf_counter()
    told = []
    teacher_embeddings(teacher, column.to_pylist, len(column), corpus_fingerprint(column), told.append)
    seconds = time.perf_counter() - start
    return {"texts": len(column), "seconds": None if "reused" in told[-1] else round(seconds, 1),
            "params": sum(p.numel() for p in teacher.model.parameters())}


def score(model, test, fusion_pairs) -> dict:
    """Vector, fusion (weight fitted on fusion_pairs) and BM25 R@1 on the test pairs, and documents embedded/s."""
    from mixret.retrieval.bm25 import BM25Params
    from mixret.retrieval.evaluate import evaluate_pairs
    from mixret.training.finetune import fit_fusion

    q = model.encode([p.query for p in fusion_pairs])
    d = model.encode([p.target for p in fusion_pairs])
    q, d = (x / (x ** 2).sum(1, keepdims=True) ** 0.5 for x in (q, d))
    fusion, _ = fit_fusion(q, d, fusion_pairs, BM25Params(), "convex", "the fusion pairs")
    rep = evaluate_pairs(test, model, None, modes=["vector", "fusion", "bm25"], fusion=fusion)
    return {"vector_r1": rep["modes"]["vector"]["R@1"], "fusion_r1": rep["modes"]["fusion"]["R@1"],
            "bm25_r1": rep["modes"]["bm25"]["R@1"], "fusion_weight": fusion.weight,
            "docs_per_s": round(rep["corpus_size"] / rep["corpus_embed_seconds"], 1), "test_n": rep["n_queries"]}


def run(args, work: Path) -> tuple[dict, list[dict]]:
    import torch

    import mixret
    from mixret.data import bundled_splits
    from mixret.training.baseline import STEncoder
    from mixret.training.loop import TRAIN_CONFIG_NAME, last_metric
    from mixret.training.pretrain import TrainConfig, pretrain

    torch.set_num_threads(args.threads)
    train, test = bundled_splits()
    texts = write_texts(work / "texts.jsonl", train[:args.train_pairs])
    fusion_pairs = train[args.train_pairs:args.train_pairs + FUSION_PAIRS]
    test = test[:args.test_pairs]
    teacher = {**teacher_pass(args, texts), **score(STEncoder.load(args.teacher), test, fusion_pairs)}
    rows = []
    for variant in args.variants.split(","):
        arch, loss = variant.split(":")
        out = work / variant.replace(":", "-")
        start = time.perf_counter()
        pretrain(TrainConfig(objective="distill", teacher=args.teacher, data=[str(texts)], arch=arch,
                             d_model=args.d_model, layers=args.layers, context=args.context, distill_loss=loss,
                             budget_minutes=args.minutes, eval_every=10**9, log_every=50, out=str(out),
                             overwrite=True, **({"n_heads": 4} if arch == "llama" else {})))
        seconds = time.perf_counter() - start
        model = mixret.load(out)
        rows.append({"student": f"{arch} d{args.d_model} x {args.layers}", "loss": loss,
                     "params": model.num_params(),
                     "steps": json.loads((out / TRAIN_CONFIG_NAME).read_text())["steps"],
                     "train_seconds": round(seconds), "val_cos": last_metric(out, "val_cos"),
                     "val_nn_agree": last_metric(out, "val_nn_agree"), **score(model, test, fusion_pairs)})
    return teacher, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    bc.add_common_args(parser, "distill")
    parser.add_argument("--teacher", required=True, help="a sentence-transformers model folder or name")
    parser.add_argument("--train-pairs", type=int, default=2000, help="pairs whose texts are distilled")
    parser.add_argument("--test-pairs", type=int, default=800, help="pairs of the bundled test split scored")
    parser.add_argument("--minutes", type=float, default=2.0, help="training minutes of each student")
    parser.add_argument("--variants", default="masked-mixer:cosine,llama:cosine,masked-mixer:mse",
                        help="comma-separated arch:loss students")
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--work", type=Path, default=None, help="keep run folders here (default: a temp dir)")
    args = parser.parse_args()
    if args.quick:
        args.train_pairs, args.test_pairs, args.minutes = 150, 60, 0.05
        args.d_model, args.layers, args.context = 32, 1, 64
    args.threads = args.threads or 2
    work = args.work or Path(tempfile.mkdtemp(prefix="mixret-distill-"))
    work.mkdir(parents=True, exist_ok=True)
    info = bc.machine_info(bc.pick_device("cpu"))
    info["threads"] = args.threads
    teacher, rows = run(args, work)
    info = bc.finish_info(info)
    t_row = {"student": f"teacher ({Path(args.teacher.rstrip('/')).name})", "loss": "-", "params": teacher["params"],
             **{k: teacher[k] for k in ("vector_r1", "fusion_r1", "bm25_r1", "fusion_weight", "docs_per_s")}}
    for r in rows:
        r["vector_vs_teacher"] = round(r["vector_r1"] / teacher["vector_r1"], 3) if teacher["vector_r1"] else None
        r["speed_vs_teacher"] = round(r["docs_per_s"] / teacher["docs_per_s"], 2)
    columns = [("student", "model"), ("loss", "loss"), ("params", "parameters"), ("steps", "steps"),
               ("val_cos", "held-out cos"), ("val_nn_agree", "nn agree"), ("vector_r1", "vector R@1"),
               ("vector_vs_teacher", "x teacher"), ("fusion_r1", "fusion R@1"), ("fusion_weight", "fusion weight"),
               ("docs_per_s", "docs/s"), ("speed_vs_teacher", "x teacher speed")]
    teacher_time = (f"{teacher['seconds']:g} s" if teacher["seconds"] is not None else "cached from an earlier run")
    intro = (f"Teacher {args.teacher} as shipped. Texts: the summaries and documents of the first "
             f"{args.train_pairs:,} pairs of the bundled training split ({teacher['texts']:,} texts, no pairs); the "
             f"teacher embedded them once in {teacher_time} on {args.threads} thread(s). Each student: "
             f"{args.minutes:g} minutes of `mixret distill` (d{args.d_model} x {args.layers}, context "
             f"{args.context}, distill's defaults otherwise: lr 1e-3, batch 32, pooling last, mixing init mean) on "
             f"{args.threads} thread(s), one after the other. Test: the first {teacher['test_n']} pairs of the bundled "
             f"test split; fusion with the default BM25 (R@1 {teacher['bm25_r1']:.3f} alone), its weight fitted on "
             f"{FUSION_PAIRS} training pairs no student saw. Held-out cos and nn agree: the run's own validation "
             f"(5% of the texts): mean cosine with the teacher through the isometry, and how often the student's "
             f"nearest neighbour is the teacher's. Docs/s: the test documents embedded per second on the same threads.")
    text = bc.write_report(args.out, "distill", "Distillation into masked-mixer and llama students", info, intro,
                           [("Results", bc.markdown_table([t_row, *rows], columns))],
                           {"teacher": teacher, "rows": rows, "args": {k: str(v) for k, v in vars(args).items()}})
    print(text)


if __name__ == "__main__":
    main()
