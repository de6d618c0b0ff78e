"""Contrastive fine-tuning from a CLM checkpoint: the collapse, its cause and the embedding head that fixes it.

    python scripts/bench_collapse.py [--out docs/bench/] [--clm-steps 60,600] [--steps 200] [--train-pairs 4000]
                                     [--threads 2] [--quick]

A small masked mixer (d128 x 2, context 256, pretrain's other defaults) is pretrained with next-token prediction
on the texts (summaries and documents) of the first --train-pairs pairs of the bundled training split, for each
--clm-steps; then each variant below fine-tunes it (or a random-init model of the same size, mixing_init mean)
for --steps steps of 32 pairs on those pairs (finetune's defaults otherwise; fixed steps, so the machine's load
changes the time, not the result). Every run logs its loss every 5 steps; step 0 is the loss before training
against chance (ln 32), with the mean pairwise cosine of the validation embeddings (near 1: every text gets about
the same embedding). Scored on the bundled test split (vector R@1, pessimistic ties). Writes OUT/collapse.md and
OUT/collapse.json.
"""
from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import bench_common as bc

SIZE = {"d_model": 128, "n_layers": 2, "context": 256}
# variant -> (start, FinetuneConfig options, loop options)
VARIANTS = {
    "random init, last token": ("random", {"pool_head": False}, {}),
    "random init, embedding head": ("random", {}, {}),
    "CLM, last token": ("clm", {"pool_head": False}, {}),
    "CLM, last token, lr 1e-4 + 50 warm-up steps, temperature 0.02": (
        "clm", {"pool_head": False, "temperature": 0.02}, {"lr": 1e-4, "warmup": 50}),
    "CLM, mean pooling": ("clm", {"pooling": "mean"}, {}),
    "CLM, embedding head (default)": ("clm", {}, {}),
}


def pretrain_texts(work: Path, pairs) -> Path:
    path = work / "texts.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for p in pairs for t in (p.query, p.target)))
    return path


def run(args, work: Path) -> list[dict]:
    import torch

    from mixret.data import bundled_splits, write_pairs_jsonl
    from mixret.models import ModelConfig, load
    from mixret.retrieval.evaluate import evaluate_pairs
    from mixret.training.finetune import FINETUNE_LOOP, FinetuneConfig, finetune
    from mixret.training.loop import METRICS_NAME, LoopConfig
    from mixret.training.pretrain import TrainConfig, pretrain

    torch.set_num_threads(args.threads)
    train, test = bundled_splits()
    train = train[:args.train_pairs]
    if args.quick:
        test = test[:80]
    write_pairs_jsonl(train, work / "train.jsonl")
    size = {"d_model": 32, "n_layers": 2, "context": 64} if args.quick else SIZE
    texts = pretrain_texts(work, train)
    rows = []
    clm_steps = [int(s) for s in args.clm_steps.split(",")]
    for n_clm in clm_steps:
        clm = pretrain(TrainConfig(data=[str(texts)], d_model=size["d_model"], layers=size["n_layers"],
                                   context=size["context"], steps=n_clm, eval_every=10**9,
                                   out=str(work / f"clm-{n_clm}"), overwrite=True))
        clm_val_loss = _last(clm / METRICS_NAME, "val_loss")
        for name, (start, options, loop) in VARIANTS.items():
            if start == "random" and n_clm != clm_steps[0]:
                continue                                      # random init does not depend on the CLM run
            init = ({"init": str(clm)} if start == "clm" else
                    {"init": "masked-mixer", "model": ModelConfig(**size, mixing_init="mean")})
            t0 = time.perf_counter()
            out = finetune(FinetuneConfig(
                pairs=str(work / "train.jsonl"), test_fraction=0.0, out=str(work / "ft"), overwrite=True,
                **init, **options,
                loop=LoopConfig(**{**FINETUNE_LOOP, "steps": args.steps, "log_every": 5, "eval_every": args.steps,
                                   "progress": False, **loop})))
            seconds = time.perf_counter() - t0
            recs = [json.loads(line) for line in (out / METRICS_NAME).read_text().splitlines()]
            losses = {r["step"]: r["loss"] for r in recs if r.get("loss") is not None}
            vector = evaluate_pairs(test, load(out), modes="vector")["modes"]["vector"]
            row = {"variant": name, "clm_steps": n_clm if start == "clm" else None,
                   "clm_val_loss": clm_val_loss if start == "clm" else None,
                   "loss_0": losses[0], "chance": recs[0]["chance"], "mean_cos_0": recs[0]["val_mean_cos"],
                   **{f"loss_{s}": losses.get(s) for s in (10, 20, 30)},
                   "loss_end": losses[args.steps], "mean_cos_end": recs[-1]["val_mean_cos"],
                   "val_r1": recs[-1]["val_r1"], "test_r1": vector["R@1"], "test_n": len(test),
                   "seconds": round(seconds, 1)}
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def _last(path: Path, key: str):
    values = [r[key] for r in map(json.loads, path.read_text().splitlines()) if r.get(key) is not None]
    return values[-1] if values else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    bc.add_common_args(parser, "collapse")
    parser.add_argument("--clm-steps", default="60,600", help="comma-separated CLM pretraining lengths")
    parser.add_argument("--steps", type=int, default=200, help="fine-tuning steps of each variant")
    parser.add_argument("--train-pairs", type=int, default=4000, help="pairs of the bundled training split used")
    parser.add_argument("--work", type=Path, default=None, help="keep run folders here (default: a temp dir)")
    args = parser.parse_args()
    if args.quick:
        args.clm_steps, args.steps, args.train_pairs = "10", 10, 300
    args.threads = args.threads or 2
    work = args.work or Path(tempfile.mkdtemp(prefix="mixret-collapse-"))
    work.mkdir(parents=True, exist_ok=True)
    info = bc.machine_info(bc.pick_device("cpu"))
    info["threads"] = args.threads
    rows = run(args, work)
    info = bc.finish_info(info)
    columns = [("variant", "variant"), ("clm_steps", "CLM steps"), ("clm_val_loss", "CLM val loss", 2),
               ("loss_0", "loss at step 0", 2), ("mean_cos_0", "mean cos at 0", 2), ("loss_10", "loss 10", 2),
               ("loss_20", "loss 20", 2), ("loss_30", "loss 30", 2), ("loss_end", f"loss {args.steps}", 2),
               ("mean_cos_end", f"mean cos at {args.steps}", 2), ("val_r1", "val R@1"), ("test_r1", "test R@1")]
    intro = (f"Masked mixer d{SIZE['d_model']} x {SIZE['n_layers']} (context {SIZE['context']}), pretrained with "
             f"next-token prediction for the given steps (pretrain's defaults otherwise: lr 4e-3, random mixing "
             f"init, BPE 4,096) on the texts of the first {args.train_pairs:,} pairs of the bundled training split, "
             f"then fine-tuned for {args.steps} steps of 32 pairs (finetune's defaults otherwise: lr 1e-3, "
             f"temperature 0.05, token dropout 0.1). Chance is ln 32 = {math.log(32):.2f}; a loss that settles "
             f"there with a mean pairwise cosine near 1 is a collapse (every text one embedding). Mean cos: mean "
             f"pairwise cosine of 512 validation embeddings (256 queries, 256 documents). Test: the bundled test "
             f"split ({rows[0]['test_n']} pairs), vector R@1 with pessimistic ties. Random-init rows do not depend "
             f"on the CLM run.")
    text = bc.write_report(args.out, "collapse", "Fine-tuning from a CLM checkpoint: collapse and fix", info,
                           intro, [("Results", bc.markdown_table(rows, columns))], {"rows": rows})
    print(text)


if __name__ == "__main__":
    main()
