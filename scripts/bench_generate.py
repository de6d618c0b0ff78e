"""Generation speed, cached vs uncached, for every registered model variant.

    python scripts/bench_generate.py [--out docs/bench/] [--context 512] [--d-model 128] [--threads N]

Each variant (randomly initialised, eval mode, fp32) greedily continues a one-token prompt until the context is
full, once with the incremental-decoding cache (`model.step`) and once recomputing the full forward pass at
every step, each the best of --repeats runs. Prints a markdown table of new tokens per second and writes it to
OUT/generate.md and OUT/generate.json. The two runs must produce the same tokens (column "same tokens").
"""
from __future__ import annotations

import argparse
import datetime
import platform
import time
from pathlib import Path

import torch

from mixret.generate import generate
from mixret.io import atomic_write_text, write_json
from mixret.models import VARIANTS, ModelConfig, build_model


def cache_bytes(model, batch_size: int) -> int:
    """Memory of a full cache for one batch."""
    return sum(t.numel() * t.element_size() for entry in model.new_cache(batch_size).layers for t in entry.values())


def time_generation(model, prompt: torch.Tensor, use_cache: bool, repeats: int) -> tuple[torch.Tensor, float]:
    """Greedy generation until the context is full; returns the ids and the new tokens per second (best run)."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        out = generate(model, prompt, max_new_tokens=model.config.context, temperature=0, use_cache=use_cache)
        best = min(best, time.perf_counter() - start)
    return out.ids, (out.ids.shape[1] - prompt.shape[1]) * prompt.shape[0] / best


def bench(args) -> list[dict]:
    rows = []
    for name, variant in VARIANTS.items():
        torch.manual_seed(0)
        cfg = ModelConfig(**{**variant, "vocab_size": args.vocab_size, "d_model": args.d_model,
                             "n_layers": args.layers, "context": args.context})
        model = build_model(cfg).eval()
        prompt = torch.randint(0, args.vocab_size, (args.batch_size, 1))
        for use_cache in (True, False):  # warm-up
            generate(model, prompt, max_new_tokens=8, temperature=0, use_cache=use_cache)
        cached_ids, cached = time_generation(model, prompt, use_cache=True, repeats=args.repeats)
        full_ids, full = time_generation(model, prompt, use_cache=False, repeats=args.repeats)
        rows.append({"variant": name, "cached_tok_s": round(cached, 1), "uncached_tok_s": round(full, 1),
                     "speedup": round(cached / full, 2), "same_tokens": torch.equal(cached_ids, full_ids),
                     "cache_kib": round(cache_bytes(model, args.batch_size) / 1024, 1),
                     "parameters": model.num_params()})
        print(f"{name}: {cached:.1f} tok/s cached, {full:.1f} tok/s uncached", flush=True)
    return rows


def markdown(rows: list[dict], setup: str) -> str:
    lines = [setup, "", "| variant | cached tok/s | uncached tok/s | speedup | same tokens | cache KiB |",
             "|---|---:|---:|---:|---|---:|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['cached_tok_s']} | {r['uncached_tok_s']} | {r['speedup']}x | "
                     f"{'yes' if r['same_tokens'] else 'NO'} | {r['cache_kib']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/bench"), help="folder for generate.{md,json}")
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3, help="time each run this often and keep the best")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    rows = bench(args)
    setup = (f"Greedy generation from a 1-token prompt to a full context of {args.context} tokens; "
             f"d_model={args.d_model}, layers={args.layers}, vocab={args.vocab_size}, batch={args.batch_size}, "
             f"fp32, best of {args.repeats}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads "
             f"({platform.machine()}), "
             f"{datetime.date.today().isoformat()}.")
    table = markdown(rows, setup)
    print(table)
    atomic_write_text(args.out / "generate.md", table)
    write_json(args.out / "generate.json", {"setup": setup, **{k: v for k, v in vars(args).items() if k != "out"},
                                            "torch": torch.__version__, "threads": torch.get_num_threads(),
                                            "date": datetime.date.today().isoformat(), "rows": rows})


if __name__ == "__main__":
    main()
