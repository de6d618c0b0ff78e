"""Distillation: mixret students of a sentence-transformers teacher at equal wall-clock, against the teacher.

    python scripts/bench_distill.py --teacher DIR_OR_NAME [--out docs/bench/] [--train-pairs 2000] [--test-pairs 800]
                                    [--minutes 2] [--variants masked-mixer:cosine,llama:cosine,masked-mixer:mse]
                                    [--finetune-minutes 0] [--select-pairs PAIRS] [--d-model 128] [--layers 2]
                                    [--context 128] [--threads 2] [--work DIR] [--quick]

The texts are the summaries and documents of the first --train-pairs pairs of the bundled training split (used as
plain texts, no pairs). The teacher embeds them once (timed; cached for every student). Each variant
(architecture:loss) is a student of the same width, depth and context distilled for --minutes on --threads threads
(`mixret distill`'s defaults otherwise), one after the other. With --finetune-minutes M each student is then
fine-tuned (`mixret finetune` from its folder, its own embedding kept) on the bundled training pairs for M
minutes, and each architecture also gets a reference: fine-tuning alone from random init for --minutes + M
minutes, the student's whole training time.

Scored on the first --test-pairs pairs of the bundled test split and, with --select-pairs, on the pairs of that
file outside the bundled corpus (the selection pairs; the dev file has 1,277), each query against its own set's
documents: vector R@1, fusion R@1 with the default BM25 (the fusion weight fitted on the 300 training pairs after
the ones whose texts were distilled; no fine-tuning trains on them) and BM25 alone, pessimistic ties; `all` is R@1
over the queries of both sets. Also documents embedded per second on the same threads and the held-out cosine with
the teacher (val_cos) of each distillation. Writes OUT/distill.md, OUT/distill.json and OUT/distill.png (R@1
against documents per second).
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


def score(model, sets: dict, fusion_pairs) -> dict:
    """Vector, fusion (weight fitted on fusion_pairs) and BM25 R@1 on each set of pairs ({name: pairs}; `all`:
    over the queries of every set), and the documents of the first set embedded per second."""
    from mixret.retrieval.bm25 import BM25Params
    from mixret.retrieval.evaluate import evaluate_pairs
    from mixret.training.finetune import fit_fusion

    q = model.encode([p.query for p in fusion_pairs])
    d = model.encode([p.target for p in fusion_pairs])
    q, d = (x / (x ** 2).sum(1, keepdims=True) ** 0.5 for x in (q, d))
    fusion, _ = fit_fusion(q, d, fusion_pairs, BM25Params(), "convex", "the fusion pairs")
    out, total = {"fusion_weight": fusion.weight}, {}
    for i, (name, pairs) in enumerate(sets.items()):
        rep = evaluate_pairs(pairs, model, None, modes=["vector", "fusion", "bm25"], fusion=fusion)
        for mode in ("vector", "fusion", "bm25"):
            out[f"{name}_{mode}_r1"] = rep["modes"][mode]["R@1"]
            total[mode] = total.get(mode, 0.0) + rep["modes"][mode]["R@1"] * rep["n_queries"]
        out[f"{name}_n"] = rep["n_queries"]
        if i == 0:
            out["docs_per_s"] = round(rep["corpus_size"] / rep["corpus_embed_seconds"], 1)
    n = sum(out[f"{name}_n"] for name in sets)
    out.update({f"all_{mode}_r1": round(v / n, 4) for mode, v in total.items()}, all_n=n)
    return out


def run(args, work: Path) -> tuple[dict, list[dict]]:
    import torch

    import mixret
    from mixret import io
    from mixret.data import bundled_splits, write_pairs_jsonl
    from mixret.models import ModelConfig
    from mixret.training.baseline import STEncoder
    from mixret.training.finetune import FinetuneConfig, finetune
    from mixret.training.loop import TRAIN_CONFIG_NAME, last_metric
    from mixret.training.pretrain import TrainConfig, pretrain

    torch.set_num_threads(args.threads)
    train, test = bundled_splits()
    texts = write_texts(work / "texts.jsonl", train[:args.train_pairs])
    fusion_pairs = train[args.train_pairs:args.train_pairs + FUSION_PAIRS]
    sets = {"test": test[:args.test_pairs]}
    if args.select_pairs:
        sets["selection"] = bc.selection_pairs(args.select_pairs, 200 if args.quick else None)
    size = dict(d_model=args.d_model, n_layers=args.layers, context=args.context)
    heads = lambda arch: {"n_heads": 4} if arch == "llama" else {}  # noqa: E731
    teacher = {**teacher_pass(args, texts), **score(STEncoder.load(args.teacher), sets, fusion_pairs)}

    ft_pairs = work / "finetune-pairs.jsonl"  # every training pair but the fusion slice
    write_pairs_jsonl(train[:args.train_pairs] + train[args.train_pairs + FUSION_PAIRS:], ft_pairs)

    def fine_tune(init: str, arch: str, minutes: float, out: Path) -> dict:
        start = time.perf_counter()
        ft = finetune(FinetuneConfig(
            pairs=str(ft_pairs), test_fraction=0.0, init=init, model=ModelConfig(arch=arch, **size, **heads(arch)),
            loop=bc.finetune_loop(minutes, eval_every=10**9),
            out=str(out), overwrite=True))
        model = mixret.load(ft)
        return {"ft_steps": io.read_json(ft / TRAIN_CONFIG_NAME)["steps"], "params": model.num_params(),
                "ft_seconds": round(time.perf_counter() - start), **score(model, sets, fusion_pairs)}

    rows = []
    for variant in args.variants.split(","):
        arch, loss = variant.split(":")
        out = work / variant.replace(":", "-")
        start = time.perf_counter()
        pretrain(TrainConfig(objective="distill", teacher=args.teacher, data=[str(texts)], arch=arch,
                             d_model=args.d_model, layers=args.layers, context=args.context, distill_loss=loss,
                             budget_minutes=args.minutes, eval_every=10**9, log_every=50, out=str(out),
                             overwrite=True, **heads(arch)))
        seconds = time.perf_counter() - start
        model = mixret.load(out)
        student = {"student": f"{arch} d{args.d_model} x {args.layers}", "arch": arch, "loss": loss,
                   "params": model.num_params(), "minutes": args.minutes,
                   "steps": io.read_json(out / TRAIN_CONFIG_NAME)["steps"], "train_seconds": round(seconds),
                   "val_cos": last_metric(out, "val_cos"), "val_nn_agree": last_metric(out, "val_nn_agree")}
        rows.append({**student, "recipe": "distilled", **score(model, sets, fusion_pairs)})
        if args.finetune_minutes:
            rows.append({**student, "recipe": f"distilled, then fine-tuned {args.finetune_minutes:g} min",
                         "minutes": args.minutes + args.finetune_minutes,
                         **fine_tune(str(out), arch, args.finetune_minutes, work / f"{out.name}-finetuned")})
    if args.finetune_minutes:
        minutes = args.minutes + args.finetune_minutes
        for arch in dict.fromkeys(v.split(":")[0] for v in args.variants.split(",")):
            rows.append({"student": f"{arch} d{args.d_model} x {args.layers}", "arch": arch, "loss": "-",
                         "recipe": f"fine-tuned {minutes:g} min from random init (no teacher)", "minutes": minutes,
                         **fine_tune(arch, arch, minutes, work / f"{arch}-finetune-only")})
    return teacher, rows


def plot(teacher: dict, rows: list[dict], key: str, path: Path, title: str) -> None:
    """R@1 (vector and fusion) against documents embedded per second, log scale: the teacher and each student."""
    plt = bc.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4), sharex=True)
    markers = {"masked-mixer": "o", "llama": "s", "hypermixer": "^"}
    for ax, mode in zip(axes, ("vector", "fusion")):
        ax.scatter([teacher["docs_per_s"]], [teacher[f"{key}_{mode}_r1"]], marker="*", s=160, color="black",
                   label="teacher")
        for i, r in enumerate(rows):
            ax.scatter([r["docs_per_s"]], [r[f"{key}_{mode}_r1"]], marker=markers.get(r["arch"], "D"),
                       color=f"C{i}", label=f"{r['student']}, {r['recipe']}")
        if mode == "fusion":
            ax.axhline(teacher[f"{key}_bm25_r1"], color="gray", linestyle="--", linewidth=1, label="BM25")
        ax.set_xscale("log")
        ax.set_xlabel("documents embedded per second (log)")
        ax.set_ylabel(f"R@1, {mode} ({key})")
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=6)
    fig.suptitle(title, fontsize=9)
    bc.save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    bc.add_common_args(parser, "distill")
    parser.add_argument("--teacher", required=True, help="a sentence-transformers model folder or name")
    parser.add_argument("--train-pairs", type=int, default=2000, help="pairs whose texts are distilled")
    parser.add_argument("--test-pairs", type=int, default=800, help="pairs of the bundled test split scored")
    parser.add_argument("--select-pairs", default=None,
                        help="also score the pairs of this file outside the bundled corpus (the selection pairs)")
    parser.add_argument("--minutes", type=float, default=2.0, help="training minutes of each student")
    parser.add_argument("--finetune-minutes", type=float, default=0.0,
                        help="then fine-tune each student on the training pairs for this long (and add a "
                             "random-init reference per architecture with the same total minutes)")
    parser.add_argument("--variants", default="masked-mixer:cosine,llama:cosine,masked-mixer:mse",
                        help="comma-separated arch:loss students")
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--work", type=Path, default=None, help="keep run folders here (default: a temp dir)")
    args = parser.parse_args()
    if args.quick:
        args.train_pairs, args.test_pairs, args.minutes = 150, 60, 0.05
        args.finetune_minutes = min(args.finetune_minutes, 0.05)
        args.d_model, args.layers, args.context = 32, 1, 64
    args.threads = args.threads or 2
    work = args.work or Path(tempfile.mkdtemp(prefix="mixret-distill-"))
    work.mkdir(parents=True, exist_ok=True)
    info = bc.machine_info(bc.pick_device("cpu"))
    info["threads"] = args.threads
    teacher, rows = run(args, work)
    info = bc.finish_info(info)
    sets = ["test", "selection"] if args.select_pairs else ["test"]
    shown = sets + ["all"] if args.select_pairs else sets  # the sets whose R@1 is shown, `all` for both
    key = "all" if args.select_pairs else "test"
    t_row = {"student": f"teacher ({Path(args.teacher.rstrip('/')).name})", "recipe": "as shipped", "loss": "-",
             **teacher}
    t_row.pop("seconds", None)
    teacher_min = teacher["seconds"] / 60 if teacher["seconds"] is not None else None
    for r in rows:
        r["vector_vs_teacher"] = round(r[f"{key}_vector_r1"] / teacher[f"{key}_vector_r1"], 3)
        r["fusion_vs_teacher"] = round(r[f"{key}_fusion_r1"] - teacher[f"{key}_fusion_r1"], 4)
        r["speed_vs_teacher"] = round(r["docs_per_s"] / teacher["docs_per_s"], 2)
        r["cpu_minutes"] = (round(r["minutes"] + teacher_min, 1) if teacher_min is not None and r["loss"] != "-"
                            else r["minutes"])
    columns = [("student", "model"), ("recipe", "recipe"), ("loss", "loss"), ("params", "parameters"),
               ("steps", "distill steps"), ("ft_steps", "finetune steps"), ("val_cos", "held-out cos"),
               *[(f"{name}_{mode}_r1", f"{name} {mode} R@1") for name in shown for mode in ("vector", "fusion")],
               ("vector_vs_teacher", f"x teacher ({key} vector)"), ("fusion_vs_teacher", f"- teacher ({key} fusion)"),
               ("docs_per_s", "docs/s"), ("speed_vs_teacher", "x teacher speed"),
               ("cpu_minutes", "training min (with the teacher's pass)")]
    teacher_time = (f"{teacher['seconds']:g} s" if teacher["seconds"] is not None else "cached from an earlier run")
    n_sets = ", ".join(f"{name} {teacher[f'{name}_n']:,} pairs" for name in sets)
    intro = (f"Teacher {args.teacher} as shipped. Texts: the summaries and documents of the first "
             f"{args.train_pairs:,} pairs of the bundled training split ({teacher['texts']:,} texts, no pairs); the "
             f"teacher embedded them once in {teacher_time} on {args.threads} thread(s). Each student: "
             f"{args.minutes:g} minutes of `mixret distill` (d{args.d_model} x {args.layers}, context "
             f"{args.context}, distill's defaults otherwise: lr 1e-3, batch 32, pooling last, mixing init mean) on "
             f"{args.threads} thread(s), one after the other"
             + (f"; then {args.finetune_minutes:g} minutes of `mixret finetune` from the student's folder on the "
                f"bundled training pairs (all but the fusion slice); references: `finetune` from random init for "
                f"{args.minutes + args.finetune_minutes:g} minutes, the same model size"
                if args.finetune_minutes else "")
             + f". Scored on: {n_sets}"
             + (f" (the selection pairs: {args.select_pairs} outside the bundled corpus; `all` counts the queries "
                f"of both)" if args.select_pairs else "")
             + "; each query against its own set's documents. Fusion with the default BM25 (R@1 alone: "
             + ", ".join(f"{name} {teacher[f'{name}_bm25_r1']:.3f}" for name in shown)
             + f"), its weight fitted on {FUSION_PAIRS} training pairs that no distillation or fine-tuning saw. "
             f"Held-out cos: the distillation's own validation (5% of the texts), mean cosine with the teacher "
             f"through the isometry. Docs/s: the test documents embedded per second on the same threads. Training "
             f"minutes are budgets (the loop's planner fixes the steps to fit); with the teacher's pass: plus its "
             f"{teacher_time} over the texts, for the distilled rows.")
    text = bc.write_report(args.out, "distill", "Distillation into masked-mixer and llama students", info, intro,
                           [("Results", bc.markdown_table([t_row, *rows], columns)),
                            ("Plot", "![R@1 against embedding throughput](distill.png)")],
                           {"teacher": teacher, "rows": rows, "args": {k: str(v) for k, v in vars(args).items()}})
    plot(teacher, rows, key, args.out / "distill.png",
         f"students of {Path(args.teacher.rstrip('/')).name}: R@1 ({key}) against throughput; {info['cpu']}, "
         f"{args.threads} thread(s)")
    print(text)


if __name__ == "__main__":
    main()
