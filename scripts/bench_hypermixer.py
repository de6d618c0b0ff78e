"""HyperMixer scaling: training-step time and peak memory against context, with least-squares fits, next to
the flat masked mixer.

    python scripts/bench_hypermixer.py [--out docs/bench/] [--threads N] [--repeats 3] [--contexts 256,...,16384]
                                       [--d-model 128] [--layers 1] [--quick]

A small model (default: d_model 128, 1 layer, byte vocabulary) trains on one sequence of L random tokens
(batch 1, so the work per step is L tokens), each context in a fresh child process exactly as in
bench_train.py (forward + backward + AdamW, best of --repeats, peak memory as there). The causal HyperMixer
should grow linearly in L; the masked mixer's L x L matrices grow quadratically. For each, a least-squares
line y = a + b L (with R^2), a parabola y = a + b L + c L^2 (with R^2), and the exponent p of y ~ L^p between
the two longest contexts.

Writes OUT/hypermixer.md, OUT/hypermixer.json and OUT/hypermixer.png.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import bench_common as bc
import bench_train
import numpy as np
import torch

ARCHS = ("hypermixer", "flat")
TRAIN_SCRIPT = Path(bench_train.__file__)


def fit(xs: list[float], ys: list[float], degree: int) -> dict:
    """Least-squares polynomial of the given degree -> coefficients (constant first) and R^2."""
    x, y = np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)
    if len(x) <= degree:
        return {"coef": None, "r2": None}
    coef = np.polyfit(x, y, degree)
    residual = y - np.polyval(coef, x)
    total = ((y - y.mean()) ** 2).sum()
    return {"coef": [float(c) for c in coef[::-1]], "r2": float(1 - (residual ** 2).sum() / total) if total else 1.0}


def exponent(xs: list[float], ys: list[float]) -> float | None:
    """p in y ~ x^p between the two largest x."""
    if len(xs) < 2 or min(ys[-2:]) <= 0:
        return None
    return float(np.log(ys[-1] / ys[-2]) / np.log(xs[-1] / xs[-2]))


def sweep(args, device: torch.device) -> list[dict]:
    rows = []
    for arch in ARCHS:
        base_rss = bench_train.tiny_rss_mib(args, device, arch) if device.type == "cpu" else 0.0
        for L in args.contexts:
            spec = bench_train.spec_for(args, device, arch, L, 1)
            row = {"arch": arch, "variant": bench_train.ARCHS[arch], "context": L,
                   **bc.run_child(TRAIN_SCRIPT, spec, timeout=args.child_timeout)}
            if row.get("status") == "ok":
                if device.type == "cpu":
                    row["peak_mib"] = row["max_rss_mib"] - base_rss
                row["step_ms"] = row["step_s"] * 1e3
                row["us_per_token"] = row["step_s"] / L * 1e6
            rows.append(row)
            print(f"{row['variant']} @ {L}: " + (f"{row['step_ms']:.1f} ms/step, {row['peak_mib']:.1f} MiB"
                                                 if row.get("status") == "ok" else row["status"]), flush=True)
    return rows


def fits(rows: list[dict]) -> list[dict]:
    out = []
    for arch in ARCHS:
        ok = [r for r in rows if r["arch"] == arch and r.get("status") == "ok"]
        xs = [r["context"] for r in ok]
        for key, what in (("step_ms", "time (ms)"), ("peak_mib", "memory (MiB)")):
            ys = [r[key] for r in ok]
            line, parabola = fit(xs, ys, 1), fit(xs, ys, 2)
            out.append({"variant": bench_train.ARCHS[arch], "quantity": what, "points": len(xs),
                        "intercept": line["coef"] and line["coef"][0], "slope": line["coef"] and line["coef"][1],
                        "r2_linear": line["r2"], "quadratic": parabola["coef"] and parabola["coef"][2],
                        "r2_quadratic": parabola["r2"], "exponent": exponent(xs, ys)})
    return out


def plot(rows: list[dict], fitted: list[dict], path: Path, title: str) -> None:
    plt = bc.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, what in ((axes[0], "step_ms", "time (ms)"), (axes[1], "peak_mib", "memory (MiB)")):
        for arch in ARCHS:
            ok = [r for r in rows if r["arch"] == arch and r.get("status") == "ok"]
            if not ok:
                continue
            xs = np.array([r["context"] for r in ok], dtype=float)
            line = ax.plot(xs, [r[key] for r in ok], "o", label=bench_train.ARCHS[arch])[0]
            f = next(f for f in fitted if f["variant"] == bench_train.ARCHS[arch] and f["quantity"] == what)
            if f["slope"] is not None:
                grid = np.linspace(0, xs.max(), 100)
                ax.plot(grid, f["intercept"] + f["slope"] * grid, "-", color=line.get_color(), alpha=0.6,
                        label=f"linear fit, R$^2$={f['r2_linear']:.3f}")
        ax.set_xlabel("context L (tokens, batch 1)")
        ax.set_ylabel(f"training step {what}")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    bc.save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    bc.add_common_args(parser, "hypermixer")
    parser.add_argument("--contexts", default=None,
                        help="comma-separated lengths (default: 256,...,16384; up to 32768 on a GPU)")
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--vocab-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=None, help="steps per timed repeat (default: 1 CPU, 10 GPU)")
    parser.add_argument("--child-timeout", type=float, default=600.0, help="seconds before a child is stopped")
    args = parser.parse_args()
    device = bc.setup(args)
    gpu = device.type == "cuda"
    if args.quick:
        args.contexts, args.d_model, args.repeats = args.contexts or "64,128,256", 16, 1
    default = "256,512,1024,2048,4096,8192,16384" + (",32768" if gpu else "")
    args.contexts = sorted(int(c) for c in (args.contexts or default).split(","))
    args.steps = args.steps or (10 if gpu else 1)
    args.max_step_s = None  # every context is measured: the point is the whole curve

    info = bc.machine_info(device)
    rows = sweep(args, device)
    fitted = fits(rows)
    info = bc.finish_info(info)
    precision = "bf16 autocast" if gpu else "fp32"
    memory = "CUDA max_memory_allocated" if gpu else "max RSS minus that of a tiny model's child (as in train.md)"
    intro = (f"One training step (forward + backward + AdamW) on a single sequence of L random tokens; "
             f"d_model={args.d_model}, layers={args.layers}, vocab={args.vocab_size}, {precision}, best of "
             f"{args.repeats} x {args.steps} step(s), a fresh process per point; peak memory: {memory}. Fits are "
             f"least squares over all points: line a + b L, parabola a + b L + c L^2; `exponent` is p in "
             f"y ~ L^p between the two longest contexts (1 = linear, 2 = quadratic).")
    cols = [("variant", "variant"), ("context", "L"), ("step_ms", "ms/step"), ("us_per_token", "us/token"),
            ("peak_mib", "peak MiB"), ("status", "status")]
    fit_cols = [("variant", "variant"), ("quantity", "quantity"), ("intercept", "a"), ("slope", "b (per token)"),
                ("r2_linear", "R^2 line", 5), ("quadratic", "c (per token^2)"), ("r2_quadratic", "R^2 parabola", 5),
                ("exponent", "exponent")]
    text = bc.write_report(
        args.out, "hypermixer", "HyperMixer scaling against context", info, intro,
        [("Fits", bc.markdown_table(fitted, fit_cols)), ("Measurements", bc.markdown_table(rows, cols)),
         ("Plot", "![step time and memory against context, with linear fits](hypermixer.png)")],
        {"args": {k: v for k, v in vars(args).items() if k not in ("out", "child")}, "rows": rows,
         "fits": fitted})
    plot(rows, fitted, args.out / "hypermixer.png",
         f"d_model={args.d_model}, layers={args.layers}, batch 1, {precision}, {info['gpu'] or info['cpu']}")
    print(text)


if __name__ == "__main__":
    main()
