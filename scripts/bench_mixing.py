"""The masked token mixing of one layer: the masked einsum product against the dense one, the theoretical
minimum, the blocked triangular product and torch.compile.

    python scripts/bench_mixing.py [--out docs/bench/] [--threads N] [--repeats 3] [--contexts 256,...,8192]
                                   [--d-model 256] [--tokens 4096] [--no-compile] [--quick]

For each length L, x [B, L, D] (B = tokens // L, at least 1) is mixed by one L x L matrix:
    einsum    (W * tril) then einsum "ts,bsd->btd"   (the masked mixer's product on CUDA and, on the CPU,
                                                        below BLOCKED_MIN_LEN)
    dense     einsum with W unmasked                   (the same product without the mask: what it pays for)
    minimum   dense / 2                                (half of the full product is zero: the ideal)
    blocked   `tril_matmul`, row blocks of BLOCK       (skips the blocks above the diagonal; FlatMix's product
                                                        on the CPU from BLOCKED_MIN_LEN on)
    compiled  torch.compile of `einsum`                (forward + backward only; compile time not included)
timed forward only (no grad) and forward + backward (gradients of W and x), best of --repeats, fp32 on the
CPU and bf16 autocast on CUDA. Also the blocked product's forward + backward time per block size, and the
largest difference of each result from `einsum` (outputs and gradients).

Writes OUT/mixing.md, OUT/mixing.json and OUT/mixing.png.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import bench_common as bc
import torch

from mixret.models.masked_mixer import BLOCK, BLOCKED_MIN_LEN, tril_matmul

METHODS = ("einsum", "dense", "blocked", "compiled")


def einsum(w: torch.Tensor, x: torch.Tensor, tril: torch.Tensor) -> torch.Tensor:
    """w [L, L], x [B, L, D], tril [L, L] 0/1 -> [B, L, D]."""
    return torch.einsum("ts,bsd->btd", w * tril, x)


def dense(w: torch.Tensor, x: torch.Tensor, tril: torch.Tensor) -> torch.Tensor:
    return torch.einsum("ts,bsd->btd", w, x)


def blocked(w: torch.Tensor, x: torch.Tensor, tril: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    B, L, D = x.shape
    return tril_matmul(w, x.transpose(0, 1).reshape(L, B * D), block).view(L, B, D).transpose(0, 1)


def timers(fn, w, x, tril, g, device, repeats: int):
    """(forward seconds without grad, forward + backward seconds, output, grad of w, grad of x)."""
    def forward():
        with torch.no_grad(), bc.autocast(device):
            return fn(w, x, tril)

    def train():
        return train_once(fn, w, x, tril, g, device)

    fwd = bc.best_time(forward, device, repeats)
    both = bc.best_time(train, device, repeats)
    y = train().detach().float()
    return fwd, both, y, w.grad.clone(), x.grad.clone()


def measure(L: int, args, device: torch.device, compiled) -> tuple[dict, list[dict]]:
    B, D = max(1, args.tokens // L), args.d_model
    torch.manual_seed(0)
    w = (torch.rand(L, L, device=device) * 2 - 1).div_(L ** 0.5).requires_grad_()
    x = torch.randn(B, L, D, device=device, requires_grad=True)
    g = torch.randn(B, L, D, device=device)
    tril = torch.ones(L, L, device=device).tril()
    row = {"context": L, "batch": B, "gflop_dense": 2 * L * L * B * D / 1e9}
    ref = None
    for name in METHODS:
        if name == "compiled" and compiled is None:
            continue
        fn = {"einsum": einsum, "dense": dense, "blocked": blocked, "compiled": compiled}[name]
        if name == "compiled":
            try:
                start = time.perf_counter()
                train_once(fn, w, x, tril, g, device)
                row["compile_s"] = time.perf_counter() - start
            except Exception as e:  # a compiler missing or failing is a result, not a crash
                row["compiled_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
                continue
        fwd, both, y, gw, gx = timers(fn, w, x, tril, g, device, args.repeats)
        if name == "compiled":
            fwd = None  # the no-grad forward would be one more compilation; only training is reported
        row[f"{name}_fwd_ms"] = None if fwd is None else fwd * 1e3
        row[f"{name}_train_ms"] = both * 1e3
        if ref is None:
            ref = (y, gw, gx)
        elif name != "dense":
            row[f"{name}_max_diff"] = max((a - b).abs().max().item() for a, b in zip((y, gw, gx), ref))
    for key in ("fwd", "train"):
        row[f"minimum_{key}_ms"] = row[f"dense_{key}_ms"] / 2
        row[f"blocked_speedup_{key}"] = row[f"einsum_{key}_ms"] / row[f"blocked_{key}_ms"]
        row[f"einsum_over_minimum_{key}"] = row[f"einsum_{key}_ms"] / row[f"minimum_{key}_ms"]
    row["dense_gflop_s"] = 3 * row["gflop_dense"] / (row["dense_train_ms"] / 1e3)
    blocks = []
    for block in args.blocks:
        if block < L:
            t = bc.best_time(lambda: train_once(lambda *a: blocked(*a, block), w, x, tril, g, device), device,
                             args.repeats)
            blocks.append({"context": L, "block": block, "train_ms": t * 1e3,
                           "speedup": row["einsum_train_ms"] / (t * 1e3)})
    return row, blocks


def train_once(fn, w, x, tril, g, device) -> torch.Tensor:
    """Forward and backward (gradients into w.grad and x.grad); returns the output."""
    w.grad = x.grad = None
    with bc.autocast(device):
        y = fn(w, x, tril)
    y.backward(g)
    return y


def plot(rows: list[dict], path: Path, title: str) -> None:
    plt = bc.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, label in ((axes[0], "fwd", "forward"), (axes[1], "train", "forward + backward")):
        for name in ("einsum", "dense", "minimum", "blocked", "compiled"):
            pts = [(r["context"], r.get(f"{name}_{key}_ms")) for r in rows if r.get(f"{name}_{key}_ms")]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=name, linestyle="--" if name == "minimum" else "-")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length L")
        ax.set_ylabel(f"{label} ms per layer")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    bc.save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    bc.add_common_args(parser, "mixing")
    parser.add_argument("--contexts", default=None, help="comma-separated lengths (default: 256,...,8192)")
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=4096, help="tokens per call: batch = tokens // L")
    parser.add_argument("--blocks", default="128,256,512,1024", help="block sizes to compare for the blocked product")
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="leave out torch.compile")
    args = parser.parse_args()
    device = bc.setup(args)
    if args.quick:
        args.contexts, args.d_model, args.tokens, args.repeats = args.contexts or "64,160", 16, 320, 1
        args.blocks, args.compile = "32", False
    args.contexts = sorted(int(c) for c in (args.contexts or "256,512,1024,2048,4096,8192").split(","))
    args.blocks = [int(b) for b in args.blocks.split(",")]

    info = bc.machine_info(device)
    compiled = torch.compile(einsum, dynamic=False) if args.compile else None
    if compiled is not None:
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 2 * len(args.contexts))
    rows, blocks = [], []
    for L in args.contexts:
        row, b = measure(L, args, device, compiled)
        rows.append(row)
        blocks += b
        print(f"L={L}: einsum {row['einsum_train_ms']:.1f} ms, blocked {row['blocked_train_ms']:.1f} ms "
              f"(forward + backward)", flush=True)
    info = bc.finish_info(info)
    precision = "bf16 autocast" if device.type == "cuda" else "fp32"
    intro = (f"One L x L masked mixing matrix times x [B, L, D], D={args.d_model}, B = {args.tokens} // L; "
             f"{precision}; best of {args.repeats}; milliseconds per call. `minimum` is half of `dense` (the mask "
             f"zeroes half of the product). `blocked` uses row blocks of {BLOCK} (the masked mixer's BLOCK; it "
             f"uses the blocked product on the CPU from L = {BLOCKED_MIN_LEN}). `x einsum` = einsum time over "
             f"the blocked time; `einsum / minimum` = how far the einsum is from the ideal. `max diff` = largest "
             f"absolute difference from `einsum` over the "
             f"output and both gradients.")
    fwd_cols = [("context", "L"), ("batch", "B"), ("einsum_fwd_ms", "einsum"), ("dense_fwd_ms", "dense"),
                ("minimum_fwd_ms", "minimum"), ("blocked_fwd_ms", "blocked"),
                ("blocked_speedup_fwd", "blocked x einsum"), ("einsum_over_minimum_fwd", "einsum / minimum")]
    train_cols = [("context", "L"), ("batch", "B"), ("einsum_train_ms", "einsum"), ("dense_train_ms", "dense"),
                  ("minimum_train_ms", "minimum"), ("blocked_train_ms", "blocked"), ("compiled_train_ms", "compiled"),
                  ("blocked_speedup_train", "blocked x einsum"), ("einsum_over_minimum_train", "einsum / minimum"),
                  ("dense_gflop_s", "dense GFLOP/s"), ("blocked_max_diff", "blocked max diff"),
                  ("compiled_max_diff", "compiled max diff"), ("compile_s", "compile s")]
    errors = sorted({r["compiled_error"] for r in rows if "compiled_error" in r})
    sections = [("Forward (no grad), ms", bc.markdown_table(rows, fwd_cols)),
                ("Forward + backward, ms", bc.markdown_table(rows, train_cols)
                 + ("\n\ntorch.compile failed: " + "; ".join(errors) if errors else "")),
                ("Blocked product by block size (forward + backward)",
                 bc.markdown_table(blocks, [("context", "L"), ("block", "block"), ("train_ms", "ms"),
                                            ("speedup", "x einsum")])),
                ("Plot", "![masked mixing time against length](mixing.png)")]
    text = bc.write_report(args.out, "mixing", "Masked token mixing, one layer", info, intro, sections,
                           {"args": {k: v for k, v in vars(args).items() if k not in ("out", "child")},
                            "block": BLOCK, "blocked_min_len": BLOCKED_MIN_LEN, "rows": rows, "blocks": blocks})
    plot(rows, args.out / "mixing.png", f"one masked mixing layer, D={args.d_model}, {args.tokens} tokens per call, "
                                        f"{precision}, {info['gpu'] or info['cpu']}")
    print(text)


if __name__ == "__main__":
    main()
