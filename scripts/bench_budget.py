"""Budget study: a fixed wall-clock budget split between pretraining (CLM or spans) and contrastive fine-tuning.

    python scripts/bench_budget.py [--out docs/bench/] [--threads 1] [--jobs 2] [--budgets 2,5]
                                   [--recipes clm,spans] [--shares 0,25,50,75] [--archs masked-mixer,llama]
                                   [--d-model 256] [--layers 4] [--context 256] [--work DIR] [--quick]

For each arch, budget B (minutes), pretraining recipe and share s, one run (a child process) does:
- s = 0 (fine-tuning alone, whatever the recipe): `mixret.training.finetune` from random init (mixing_init mean, a BPE
  tokenizer trained on the training pairs) with budget_minutes = B;
- s > 0: `mixret.training.pretrain.pretrain` with the recipe's objective (budget_minutes = s * B) on texts of the
  training split of the pairs only, then `finetune` from that folder with budget_minutes = (1 - s) * B. Recipe
  `clm`: next-token prediction on the summary and the document of each pair, as separate documents; recipe
  `spans`: the span objective (`pretrain --objective spans`: a span of each document against the batch's
  documents) on the documents alone, as a user with documents and no pairs would have them; recipe `clm-spans`
  (any objectives joined by -): CLM for half the pretraining minutes, then spans from the CLM model (`pretrain
  --init`) for the other half. Each writes its texts to a temporary JSONL; its own 5 % validation documents give
  the validation loss (clm) or span R@1 (spans).
Every budget is resolved by the shared loop (`LoopConfig.budget_minutes`: a few real steps and one evaluation
are timed, the step count is fixed to fit). Both phases use the same model size and a BPE tokenizer of the same
size; the pretraining uses the same mixing init as the random-init fine-tuning (--pretrain-init), so the only
difference between shares is the CLM phase. Fine-tuning keeps its defaults (last-token pooling, InfoNCE,
batch 32, lr 1e-3) and its own validation slice, on which the fusion weight is fitted.

Each fine-tuned model is then scored on the test split (hash split 0.1, never trained on; every test query
against all test documents): R@1 and MRR@10 of `vector` (the model's pooling), `fusion` (the saved
fusion.json) and `bm25`. Also recorded: steps and wall seconds of each phase, the pretraining's validation
loss, the fine-tuning's validation R@1, and the load average at each run's start and end.

--jobs runs that many children at once (the two archs of one (budget, share) side by side, so that they see
the same contention); their budget timings then include it. With --work the run folders and logs are kept, and
--reuse then takes the results already there (a study cut short, continued or re-tabulated; --tabulate: only
those).
Writes OUT/budget.md, OUT/budget.json and OUT/budget.png (test R@1 against the pretraining share, one line
per arch and budget).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import bench_common as bc

ARCHS = ("masked-mixer", "llama")
SHORT = {"masked-mixer": "mixer", "llama": "llama", "hypermixer": "hyper"}
MODES = ("vector", "fusion", "bm25")
OBJECTIVES = ("clm", "spans")  # pretraining objectives before fine-tuning; a recipe is one or several, joined by -
QUICK_PAIRS = 800  # pairs of the bundled corpus a --quick run uses


# -- one run (in a child process) ----------------------------------------------------------------

def child(spec: dict) -> dict:
    """Pretrain (share > 0) then fine-tune within the budget, and score the result on the test split."""
    import mixret.training.pretrain
    from mixret import io
    from mixret.data import load_pairs, split_pairs, write_pairs_jsonl
    from mixret.models import ModelConfig, load
    from mixret.retrieval.evaluate import evaluate_pairs
    from mixret.retrieval.fusion import FUSION_NAME, Fusion
    from mixret.training.finetune import FinetuneConfig, finetune
    from mixret.training.loop import TRAIN_CONFIG_NAME, last_metric
    from mixret.training.pretrain import TrainConfig, pretrain

    mixret.training.pretrain.sample_hook = None  # no text samples at each evaluation: time the study does not need
    work = Path(spec["work"])
    work.mkdir(parents=True, exist_ok=True)
    arch, budget, share, recipe = spec["arch"], spec["budget"], spec["share"] / 100, spec.get("recipe", "clm")
    size = dict(d_model=spec["d_model"], n_layers=spec["layers"], context=spec["context"])
    train, test = split_pairs(load_pairs(spec["pairs"]), 0.1)
    result = {"load_start": round(os.getloadavg()[0], 2), "n_train_pairs": len(train), "n_test_pairs": len(test)}
    run_start = time.perf_counter()

    init = arch
    if share > 0:
        texts = work / "pretrain-texts.jsonl"  # the training split only: never a test pair's text
        write_pairs_jsonl(train, texts)
        start = time.perf_counter()
        objectives = recipe.split("-")  # one after the other, each from the last one's folder, sharing the minutes
        steps = []
        for i, objective in enumerate(objectives):
            options = ({"objective": "spans", "text_field": ["document"]} if objective == "spans" else
                       {"text_field": ["summary", "document"], "batch_size": spec["pretrain_batch"]})
            pt = pretrain(TrainConfig(
                model=ModelConfig(arch=arch, mixing_init=spec["pretrain_init"], **size), data=[str(texts)],
                tokenizer="bpe-lower", vocab_size=spec["vocab_size"], budget_minutes=share * budget / len(objectives),
                init=None if i == 0 else init, out=str(work / f"pretrain-{i}-{objective}"), overwrite=True,
                **options))
            steps.append(io.read_json(pt / TRAIN_CONFIG_NAME)["steps"])
            init = str(pt)
        result.update(pretrain_seconds=time.perf_counter() - start,
                      pretrain_steps=steps[0] if len(steps) == 1 else "+".join(map(str, steps)),
                      pretrain_val_loss=last_metric(pt, "val_loss"), pretrain_val_r1=last_metric(pt, "val_r1"))
    else:
        result.update(pretrain_seconds=0.0, pretrain_steps=0, pretrain_val_loss=None, pretrain_val_r1=None)

    start = time.perf_counter()
    ft = finetune(FinetuneConfig(
        pairs=spec["pairs"], init=init, model=ModelConfig(arch=arch, mixing_init="mean", **size),
        vocab_size=spec["vocab_size"], val_pairs=spec["val_pairs"], batch_size=spec["finetune_batch"],
        loop=bc.finetune_loop((1 - share) * budget),
        out=str(work / "finetune"), overwrite=True))
    result.update(finetune_seconds=time.perf_counter() - start,
                  finetune_steps=io.read_json(ft / TRAIN_CONFIG_NAME)["steps"],
                  val_r1=last_metric(ft, "val_r1"), val_fusion_r1=last_metric(ft, "val_fusion_r1"))

    start = time.perf_counter()
    model = load(ft)
    fusion = Fusion.from_dict(io.read_json(ft / FUSION_NAME), str(ft / FUSION_NAME))
    pooling = model.embedding_defaults.get("pooling", "last")
    report = evaluate_pairs(test, model, modes=list(MODES), fusion=fusion, pooling=pooling)
    result.update(eval_seconds=time.perf_counter() - start, pooling=pooling,
                  fusion_weight=fusion.weight, params=model.num_params(), corpus_size=report["corpus_size"],
                  chance_r1=report["chance"]["R@1"], run_seconds=time.perf_counter() - run_start,
                  load_end=round(os.getloadavg()[0], 2))
    for mode in MODES:
        result[f"{mode}_r1"] = report["modes"][mode]["R@1"]
        result[f"{mode}_mrr10"] = report["modes"][mode]["MRR@10"]
    return result


# -- the study ----------------------------------------------------------------------------------

def parse_log(text: str, returncode: int | None = None) -> dict | None:
    """A child's output -> {"status": "ok", ...results}, or a failure status (None: no result and no exit code)."""
    lines = text.splitlines()
    found = [line for line in lines if line.startswith(bc.RESULT_PREFIX)]
    if found:
        return {"status": "ok", **json.loads(found[-1][len(bc.RESULT_PREFIX):])}
    if returncode is None:
        return None
    return {"status": f"failed (exit {returncode}): {(lines or ['no output'])[-1][:200]}"}


def run_one(spec: dict, timeout: float, reuse: bool = False) -> dict:
    """Run one spec in a child process (its output in WORK/log.txt) -> the spec with its results; with `reuse`,
    a result already in WORK/log.txt is taken instead."""
    log = Path(spec["work"]) / "log.txt"
    if reuse and log.is_file() and (done := parse_log(log.read_text())) is not None:
        return {**spec, **done, "reused": True}
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(bc.REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, __file__, "--child", json.dumps(spec)]
    result = {"status": f"timed out after {timeout:.0f} s"}
    with open(log, "w") as f:
        try:
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout,
                                  env=env)
        except subprocess.TimeoutExpired:
            proc = None
        if proc is not None:
            f.write(proc.stdout)
            result = parse_log(proc.stdout, proc.returncode)
    return {**spec, **result}


def name_of(spec: dict) -> str:
    recipe = f"-{spec.get('recipe', 'clm')}" if spec["share"] else ""
    return f"{SHORT.get(spec['arch'], spec['arch'])}-b{spec['budget']:g}-s{spec['share']}{recipe}"


def recipe_label(row: dict) -> str:
    return "fine-tuning alone" if row["share"] == 0 else f"{row['share']:g} % {row.get('recipe', 'clm')}"


def plot(rows: list[dict], bm25: float | None, path: Path, title: str) -> None:
    """Test R@1 against the budget (minutes, log scale): a line per arch and recipe, vector and fusion side by
    side, so that where a pretraining recipe crosses fine-tuning alone, and how far apart the archs are, show."""
    plt = bc.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4), sharey=True)
    colors = {"masked-mixer": "tab:blue", "llama": "tab:orange", "hypermixer": "tab:green"}
    order = sorted(rows, key=lambda r: (r["share"], r.get("recipe", "")))
    recipes = list(dict.fromkeys(recipe_label(r) for r in order))
    for ax, mode in zip(axes, ("vector", "fusion")):
        for arch in dict.fromkeys(r["arch"] for r in rows):
            for j, recipe in enumerate(recipes):
                pts = sorted((r["budget"], r[f"{mode}_r1"]) for r in rows if r["arch"] == arch
                             and recipe_label(r) == recipe and r.get(f"{mode}_r1") is not None)
                if pts:
                    ax.plot(*zip(*pts), marker="osv^Dx"[j % 6], linestyle=["-", "--", ":", "-."][j % 4],
                            color=colors.get(arch), label=f"{arch}, {recipe}")
        if bm25 is not None:
            ax.axhline(bm25, color="gray", linestyle="--", linewidth=1, label="BM25")
        ax.set_xscale("log")
        budgets = sorted({r["budget"] for r in rows})
        ax.set_xticks(budgets, [f"{b:g}" for b in budgets])
        ax.minorticks_off()
        ax.set_xlabel("wall-clock budget (minutes, pretraining + fine-tuning)")
        ax.set_ylabel(f"test R@1 ({mode})")
        ax.set_title(mode)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=6)
    fig.suptitle(title, fontsize=9)
    bc.save_figure(fig, path)


def comparisons(rows: list[dict]) -> list[dict]:
    """Mixer against llama at each (budget, share): equal wall-clock budgets."""
    out = []
    keyed = {(r["arch"], r["budget"], r["share"], r.get("recipe", "clm")): r for r in rows}
    for (arch, budget, share, recipe), m in keyed.items():
        other = keyed.get(("llama", budget, share, recipe))
        if arch != "masked-mixer" or other is None:
            continue
        out.append({"budget": budget, "share": share, "recipe": recipe,
                    "vector_ratio": m["vector_r1"] / other["vector_r1"] if other["vector_r1"] else None,
                    **{f"{k}_{side}": r.get(k) for side, r in (("mixer", m), ("llama", other))
                       for k in ("vector_r1", "fusion_r1", "finetune_steps")},
                    "vector_diff": m["vector_r1"] - other["vector_r1"],
                    "fusion_diff": m["fusion_r1"] - other["fusion_r1"]})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    bc.add_common_args(parser, "budget")
    parser.add_argument("--budgets", default="2,5", help="comma-separated wall-clock budgets, minutes")
    parser.add_argument("--shares", default="0,25,50,75", help="comma-separated pretraining shares, percent")
    parser.add_argument("--recipes", default="clm",
                        help="comma-separated pretraining recipes: clm, spans, or several one after the other, "
                             "joined by - (clm-spans: CLM, then spans from the CLM model), sharing the minutes")
    parser.add_argument("--archs", default=",".join(ARCHS))
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--vocab-size", type=int, default=2048)
    parser.add_argument("--pretrain-init", default="mean", choices=("mean", "random"),
                        help="mixing init of the pretrained models (random init fine-tuning always uses mean)")
    parser.add_argument("--jobs", type=int, default=2, help="runs at once")
    parser.add_argument("--work", type=Path, default=None, help="keep the run folders here (default: a temp dir)")
    parser.add_argument("--reuse", action="store_true",
                        help="take the result of each run whose WORK/NAME/log.txt already holds one (a study cut "
                             "short, continued or re-tabulated; the sizes must be the same)")
    parser.add_argument("--tabulate", action="store_true",
                        help="with --reuse: only tabulate the results already in --work, leaving out runs without one")
    args = parser.parse_args()
    device = bc.setup(args)
    if device.type != "cpu":
        print("note: the study was designed for the CPU; the budgets are timed on", device, flush=True)
    if args.threads:  # tokenizers (rayon) and FAISS (OpenMP) in the children too
        os.environ.update(RAYON_NUM_THREADS=str(args.threads), OMP_NUM_THREADS=str(args.threads))
    from mixret.data import bundled_pairs_path, load_pairs, write_pairs_jsonl

    shares = [int(s) for s in args.shares.split(",")]
    budgets = [float(b) for b in args.budgets.split(",")]
    archs = args.archs.split(",")
    sizes = dict(d_model=args.d_model, layers=args.layers, context=args.context, vocab_size=args.vocab_size,
                 val_pairs=500, pretrain_batch=16, finetune_batch=32)
    if args.quick:
        sizes.update(d_model=min(args.d_model, 32), layers=min(args.layers, 2), context=min(args.context, 64),
                     vocab_size=min(args.vocab_size, 320), val_pairs=50, finetune_batch=16)
        if args.budgets == parser.get_default("budgets"):
            budgets = [0.05]
        if args.shares == parser.get_default("shares"):
            shares = [0, 50]

    info = bc.machine_info(device)
    tmp = tempfile.TemporaryDirectory(prefix="bench_budget_") if args.work is None else None
    work = Path(tmp.name) if tmp is not None else args.work
    pairs = bundled_pairs_path()
    if args.quick:
        pairs = work / "pairs.jsonl"
        write_pairs_jsonl(load_pairs(bundled_pairs_path())[:QUICK_PAIRS], pairs)
    if args.tabulate and not (args.reuse and args.work):
        parser.error("--tabulate needs --reuse and --work")
    recipes = args.recipes.split(",")
    if any(set(r.split("-")) - set(OBJECTIVES) for r in recipes):
        parser.error(f"--recipes: expected objectives from {', '.join(OBJECTIVES)} (one after the other: joined "
                     f"by -, e.g. clm-spans), got {args.recipes}")
    specs = [{"arch": arch, "budget": budget, "share": share, "recipe": recipe if share else "finetune",
              "pairs": str(pairs), "threads": args.threads, "pretrain_init": args.pretrain_init, **sizes}
             for budget in sorted(budgets, reverse=True) for share in shares
             for recipe in (recipes if share else recipes[:1]) for arch in archs]
    for spec in specs:
        spec["work"] = str(work / name_of(spec))
    if args.tabulate:
        specs = [s for s in specs if (log := Path(s["work"]) / "log.txt").is_file() and parse_log(log.read_text())]
    print(f"{len(specs)} runs, {args.jobs} at a time, {sum(s['budget'] for s in specs):g} budget minutes in all; "
          f"load average {info['load_start']}", flush=True)
    started = time.perf_counter()
    rows = []
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = [pool.submit(run_one, spec, 60 * spec["budget"] * 2 + 900, args.reuse) for spec in specs]
        for future in futures:
            row = future.result()
            rows.append(row)
            if row["status"] == "ok":
                reused = " (reused)" if row.get("reused") else ""
                print(f"{name_of(row)}{reused}: pretrain {row['pretrain_steps']} steps (val loss "
                      f"{bc.fmt(row['pretrain_val_loss'])}), finetune {row['finetune_steps']} steps; test R@1 "
                      f"vector {row['vector_r1']:.3f}, fusion {row['fusion_r1']:.3f}, bm25 {row['bm25_r1']:.3f}; "
                      f"{row['run_seconds']:.0f} s, load {row['load_start']} -> {row['load_end']}", flush=True)
            else:
                print(f"{name_of(row)}: {row['status']} (log: {row['work']}/log.txt)", flush=True)
    wall = time.perf_counter() - started
    info = bc.finish_info(info)
    if tmp is not None:
        tmp.cleanup()

    ok = [r for r in rows if r["status"] == "ok"]
    for r in rows:
        r["pretrain_pct"] = r["share"]
        r.pop("work", None)
        r.pop("pairs", None)
    bm25 = ok[0]["bm25_r1"] if ok else None
    bm25_mrr = ok[0]["bm25_mrr10"] if ok else None
    bm25_same = len({(r["bm25_r1"], r["bm25_mrr10"]) for r in ok}) <= 1
    for r in ok:
        r["vs_bm25"] = r["fusion_r1"] - bm25
    cols = [("budget", "budget min"), ("arch", "arch"), ("recipe", "recipe"), ("share", "pretrain %"),
            ("pretrain_steps", "pretrain steps"), ("pretrain_val_loss", "pretrain val loss"),
            ("pretrain_val_r1", "pretrain val R@1"), ("finetune_steps", "finetune steps"),
            ("pretrain_seconds", "pretrain s"), ("finetune_seconds", "finetune s"),
            ("val_r1", "val R@1"), ("vector_r1", "vector R@1"), ("vector_mrr10", "vector MRR@10"),
            ("fusion_weight", "fusion w"), ("fusion_r1", "fusion R@1"), ("fusion_mrr10", "fusion MRR@10"),
            ("load_start", "load start"), ("load_end", "load end")]
    failed = [f"{name_of(r)}: {r['status']}" for r in rows if r["status"] != "ok"]
    table = bc.markdown_table(ok, cols) + ("\n\nFailed runs: " + "; ".join(failed) if failed else "")
    pairs_cmp = comparisons(ok)
    cmp_cols = [("budget", "budget min"), ("recipe", "recipe"), ("share", "pretrain %"),
                ("vector_r1_mixer", "mixer vector R@1"), ("vector_r1_llama", "llama vector R@1"),
                ("vector_diff", "mixer - llama (vector)"), ("vector_ratio", "mixer / llama (vector)"),
                ("fusion_r1_mixer", "mixer fusion R@1"), ("fusion_r1_llama", "llama fusion R@1"),
                ("fusion_diff", "mixer - llama (fusion)"), ("finetune_steps_mixer", "mixer ft steps"),
                ("finetune_steps_llama", "llama ft steps")]
    n_test = ok[0]["n_test_pairs"] if ok else "?"
    intro = (
        f"Each run gets a fixed wall-clock budget, split between pretraining (recipe clm: next-token prediction on "
        f"the summaries and documents of the training split only; spans: the span objective on its documents "
        f"only; recipes joined by -, e.g. clm-spans: one after the other, each from the last one's model, sharing "
        f"the pretraining minutes) and contrastive fine-tuning (the rest; recipe finetune: all of it); every phase "
        f"is sized by "
        f"`budget_minutes` (steps timed on this machine; tokenizer training, data loading and the test evaluation "
        f"are outside the budget: see `pretrain s` and `finetune s` for the phases' real wall time, budget timing "
        f"included). Models: d_model {sizes['d_model']}, {sizes['layers']} layers, context {sizes['context']}, "
        f"case-folded BPE {sizes['vocab_size']} (bpe-lower); pretraining batch {sizes['pretrain_batch']}, mixing init "
        f"{args.pretrain_init}; fine-tuning from random init uses mixing init mean; fine-tuning batch "
        f"{sizes['finetune_batch']}, last-token pooling, validation slice of {sizes['val_pairs']} training pairs "
        f"(the fusion weight is fitted there). Test: {n_test} held-out pairs (hash split 0.1), each summary "
        f"against all {ok[0]['corpus_size'] if ok else '?'} test documents. BM25 on the same split: R@1 "
        f"{bc.fmt(bm25)}, MRR@10 {bc.fmt(bm25_mrr)}{'' if bm25_same else ' (it differed between runs!)'}; "
        f"chance R@1 {bc.fmt(ok[0]['chance_r1'] if ok else None)}. {args.jobs} run(s) at a time, "
        f"{args.threads or 'default'} torch thread(s) each; the two archs of one (budget, share) ran side by "
        f"side. Wall time of the whole study: {wall / 60:.1f} min"
        + (f" (this invocation; {sum(1 for r in ok if r.get('reused'))} results taken from an earlier one)"
           if any(r.get("reused") for r in ok) else "") + ".")
    sections = [("Runs", table),
                ("Mixer against llama at equal wall-clock budget", bc.markdown_table(pairs_cmp, cmp_cols)),
                ("Plot", "![test R@1 against the budget, a line per arch and recipe](budget.png)")]
    text = bc.write_report(args.out, "budget", "Budget study: pretraining against contrastive fine-tuning", info,
                           intro, sections,
                           {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                                     if k not in ("out", "child")},
                            "sizes": sizes, "budgets": budgets, "shares": shares, "archs": archs,
                            "bm25": {"R@1": bm25, "MRR@10": bm25_mrr, "same_in_every_run": bm25_same},
                            "wall_seconds": wall, "rows": rows, "comparisons": pairs_cmp})
    plot(ok, bm25, args.out / "budget.png",
         f"test R@1 after pretraining + fine-tuning within a fixed budget; d{sizes['d_model']} x {sizes['layers']}, "
         f"context {sizes['context']}; {info['cpu']}, {args.threads or 'default'} thread(s) per run")
    print(text)
    if failed:
        raise SystemExit(f"{len(failed)} run(s) failed")


if __name__ == "__main__":
    bc.main_or_child(child, main)
