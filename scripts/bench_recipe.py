"""Fine-tuning recipes at equal wall-clock time: which tokenizer, token dropout and budget make the best retriever.

    python scripts/bench_recipe.py --select-pairs HELD_OUT [--out docs/bench/] [--minutes 4.5] [--jobs 2]
                                   [--threads 1] [--recipes NAME,...] [--work DIR] [--quick]

Each recipe is a set of `FinetuneConfig` options (RECIPES below). A run (a child process, --threads threads)
fine-tunes a masked mixer d256 x 4 from random init (mixing_init mean, last-token pooling) on the training split
of the bundled corpus for --minutes of wall-clock (the loop's budget planner fixes the step count; a recipe
with "minutes" in its options overrides it), then scores it with `vector`, `fusion` (its saved weight) and
`bm25` on:
- the selection pairs (--select-pairs, any pairs file mixret reads; pairs of the bundled corpus are left out,
  and the first --select-size of the rest, by a hash of the id, are kept): what a recipe is chosen on;
- the bundled test split: reported beside it, never used to choose.
--jobs runs that many recipes at once (side by side, so they see the same contention: compare recipes within
one run of the script). Writes OUT/recipe.md and OUT/recipe.json.
"""
from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import bench_common as bc

MODES = ("vector", "fusion", "bm25")
BASE = {"tokenizer": "bpe", "vocab_size": 4096, "token_dropout": 0.0}   # the recipe before case folding
RECIPES = {
    "bpe 4k": {},
    "bpe 16k": {"vocab_size": 16384},
    "bpe-lower 8k": {"tokenizer": "bpe-lower", "vocab_size": 8192},
    "bpe-lower 4k": {"tokenizer": "bpe-lower"},
    "bpe-lower 2k": {"tokenizer": "bpe-lower", "vocab_size": 2048},
    "bpe-lower 4k + dropout 0.1": {"tokenizer": "bpe-lower", "token_dropout": 0.1},
    "bpe-lower 2k + dropout 0.1": {"tokenizer": "bpe-lower", "vocab_size": 2048, "token_dropout": 0.1},
    "bpe-lower 2k + 2x time": {"tokenizer": "bpe-lower", "vocab_size": 2048, "minutes": 2.0},
    "bpe-lower 2k + dropout 0.1 + 2x time": {"tokenizer": "bpe-lower", "vocab_size": 2048, "token_dropout": 0.1,
                                           "minutes": 2.0},
}


def child(spec: dict) -> dict:
    from mixret import io
    from mixret.data import bundled_splits, write_pairs_jsonl
    from mixret.models import ModelConfig, load
    from mixret.retrieval.evaluate import evaluate_pairs
    from mixret.retrieval.fusion import load_fusion
    from mixret.training.finetune import FINETUNE_MODEL, FinetuneConfig, finetune
    from mixret.training.loop import TRAIN_CONFIG_NAME

    work = Path(spec["work"])
    work.mkdir(parents=True, exist_ok=True)
    train, test = bundled_splits()
    if spec["quick"]:
        train, test = train[:600], test[:80]
    write_pairs_jsonl(train, work / "train.jsonl.gz")
    options = {**BASE, **spec["options"]}
    minutes = spec["minutes"] * options.pop("minutes", 1.0)
    model = ModelConfig(**{**FINETUNE_MODEL, **({"d_model": 32, "n_layers": 2, "context": 64}
                                                if spec["quick"] else {})})
    start = time.perf_counter()
    ft = finetune(FinetuneConfig(
        pairs=str(work / "train.jsonl.gz"), test_fraction=0.0, init="masked-mixer", model=model, **options,
        loop=bc.finetune_loop(minutes, eval_every=10**9),
        out=str(work / "model"), overwrite=True))
    result = {"minutes": minutes, "seconds": time.perf_counter() - start,
              "steps": io.read_json(ft / TRAIN_CONFIG_NAME)["steps"]}
    model, fusion = load(ft), load_fusion(ft)
    select = bc.selection_pairs(spec["select_pairs"], spec["select_size"])
    for split, pairs in (("select", select), ("test", test)):
        report = evaluate_pairs(pairs, model, modes=list(MODES), fusion=fusion)
        result[f"{split}_n"] = report["n_queries"]
        for mode in MODES:
            result[f"{split}_{mode}_r1"] = report["modes"][mode]["R@1"]
    result["fusion_weight"] = fusion.weight
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    bc.add_common_args(parser, "recipe")
    parser.add_argument("--select-pairs", required=True, help="held-out pairs to choose recipes on")
    parser.add_argument("--select-size", type=int, default=2000)
    parser.add_argument("--minutes", type=float, default=4.5, help="fine-tuning wall-clock of each recipe")
    parser.add_argument("--jobs", type=int, default=2, help="recipes run at once")
    parser.add_argument("--recipes", default=",".join(RECIPES), help="comma-separated names from RECIPES")
    parser.add_argument("--work", type=Path, default=None, help="keep run folders here (default: a temp dir)")
    args = parser.parse_args()
    names = [n.strip() for n in args.recipes.split(",") if n.strip()]
    unknown = [n for n in names if n not in RECIPES]
    if unknown:
        raise SystemExit(f"unknown recipe(s) {unknown}; expected names from {list(RECIPES)}")
    threads = args.threads or 1
    minutes = 0.1 if args.quick else args.minutes
    import tempfile
    work = args.work or Path(tempfile.mkdtemp(prefix="mixret-recipe-"))
    info = bc.machine_info(bc.pick_device("cpu"))
    info["threads"] = threads

    def one(name: str) -> dict:
        spec = {"options": RECIPES[name], "minutes": minutes, "threads": threads, "quick": args.quick,
                "select_pairs": args.select_pairs, "select_size": 200 if args.quick else args.select_size,
                "work": str(work / name.replace(" ", "_").replace("+", ""))}
        result = bc.run_child(__file__, spec)
        print(f"{name}: {json.dumps(result)}", flush=True)
        return {"recipe": name, **result}

    with ThreadPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(one, names))
    info = bc.finish_info(info)
    columns = [("recipe", "recipe"), ("steps", "steps"), ("seconds", "seconds"),
               ("select_vector_r1", "select vector R@1"), ("select_fusion_r1", "select fusion R@1"),
               ("select_bm25_r1", "select BM25 R@1"), ("test_vector_r1", "test vector R@1"),
               ("test_fusion_r1", "test fusion R@1"), ("test_bm25_r1", "test BM25 R@1"),
               ("fusion_weight", "fusion weight", 2)]
    n = next((r for r in rows if "select_n" in r), {})
    intro = (f"Masked mixer d256 x 4 fine-tuned from random init for {minutes} min of wall-clock per recipe "
             f"(times the recipe's factor), {args.jobs} recipes at a time, {threads} thread(s) each. Selection: "
             f"{n.get('select_n', '?')} held-out pairs of {args.select_pairs} outside the bundled corpus; test: the "
             f"bundled test split ({n.get('test_n', '?')} pairs), shown but not used to choose. R@1 with "
             f"pessimistic ties. Options not named: {json.dumps(BASE)} and finetune's defaults.")
    text = bc.write_report(args.out, "recipe", "Fine-tuning recipes at equal time", info, intro,
                           [("Results", bc.markdown_table(rows, columns))], {"rows": rows})
    print(text)


if __name__ == "__main__":
    bc.main_or_child(child, main)
