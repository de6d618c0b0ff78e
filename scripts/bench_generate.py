"""Generation speed, cached vs uncached, for every registered model variant.

    python scripts/bench_generate.py [--out docs/bench/] [--context 512] [--d-model 128] [--threads N] [--quick]

Each variant (randomly initialised, eval mode, fp32) greedily continues a one-token prompt until the context is
full, once with the incremental-decoding cache (`model.step`) and once recomputing the full forward pass at
every step, each the best of --repeats runs. Prints a markdown table of new tokens per second and writes it to
OUT/generate.md and OUT/generate.json. The two runs must produce the same tokens (column "same tokens").
"""
from __future__ import annotations

import argparse

import bench_common as bc
import torch

from mixret.models import VARIANTS, ModelConfig, build_model
from mixret.models.generate import generate


def cache_bytes(model, batch_size: int) -> int:
    """Memory of a full cache for one batch."""
    return sum(t.numel() * t.element_size() for entry in model.new_cache(batch_size).layers for t in entry.values())


def time_generation(model, prompt: torch.Tensor, use_cache: bool, repeats: int) -> tuple[torch.Tensor, float]:
    """Greedy generation until the context is full; returns the ids and the new tokens per second (best run)."""
    def run():
        return generate(model, prompt, max_new_tokens=model.config.context, temperature=0, use_cache=use_cache)

    seconds = bc.best_time(run, prompt.device, repeats, warmup=0)
    ids = run().ids
    return ids, (ids.shape[1] - prompt.shape[1]) * prompt.shape[0] / seconds


def bench(args, device: torch.device) -> list[dict]:
    rows = []
    for name, variant in VARIANTS.items():
        torch.manual_seed(0)
        cfg = ModelConfig(**{**variant, "vocab_size": args.vocab_size, "d_model": args.d_model,
                             "n_layers": args.layers, "context": args.context})
        model = build_model(cfg).to(device).eval()
        prompt = torch.randint(0, args.vocab_size, (args.batch_size, 1), device=device)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    bc.add_common_args(parser, "generate")
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--batch-size", type=int, default=1)
    args = parser.parse_args()
    device = bc.setup(args)
    if args.quick:
        args.context, args.d_model, args.layers, args.vocab_size, args.repeats = 16, 16, 1, 64, 1

    info = bc.machine_info(device)
    rows = bench(args, device)
    info = bc.finish_info(info)
    intro = (f"Greedy generation from a 1-token prompt to a full context of {args.context} tokens; "
             f"d_model={args.d_model}, layers={args.layers}, vocab={args.vocab_size}, batch={args.batch_size}, "
             f"fp32, best of {args.repeats}. `same tokens`: the cached and the recomputing runs produced the "
             f"same tokens.")
    table = bc.markdown_table(rows, [("variant", "variant"), ("cached_tok_s", "cached tok/s"),
                                     ("uncached_tok_s", "uncached tok/s"), ("speedup", "speedup"),
                                     ("same_tokens", "same tokens"), ("cache_kib", "cache KiB")])
    text = bc.write_report(args.out, "generate", "Generation with and without the cache", info, intro,
                           [("Tokens per second", table)],
                           {"args": {k: v for k, v in vars(args).items() if k not in ("out", "child")},
                            "rows": rows})
    print(text)


if __name__ == "__main__":
    main()
