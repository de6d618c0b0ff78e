"""Training throughput, peak memory and FLOP rate per architecture at matched width and depth.

    python scripts/bench_train.py [--out docs/bench/] [--threads N] [--repeats 3] [--contexts 128,512,2048,4096,8192]
                                  [--archs flat,expanded,heads,hypermixer,llama] [--d-model D] [--layers N] [--quick]

One training step = forward + backward + AdamW step on random tokens, with `--tokens` tokens per step
(batch = tokens // context, at least 1), fp32 on the CPU and bf16 autocast on CUDA. Every (architecture,
context) runs in a fresh child process: the best of --repeats timed steps (each --steps steps long) after
warm-up, and the peak memory of the whole run (params, gradients, AdamW state, activations): CUDA
max_memory_allocated on a GPU; on the CPU, max RSS minus that of a child that trained a tiny model of the same
architecture for one step (which holds the interpreter, torch and the kernels, but none of the data).
On the CPU a context is skipped when a step would take longer than --max-step-s: estimated from the contexts
before it (time per token extrapolated linearly in L), or when the warm-up step, which also allocates
everything, takes more than twice that.

Model FLOPs per token (training = 3x forward), written down in docs/benchmarks.md:
    6 * (weights of every nn.Linear, LM head included)  +  n_layers * mixing term, with the mixing term
    masked mixer  6 * L * D * n_mats / heads   (each L x L matrix times [L, D/heads]; counted dense)
    llama         12 * L * D                   (QK^T and AV, counted dense as in the PaLM appendix)
    hypermixer    12 * hyper_dim * D           (outer products, prefix sums and contractions per position)
Achieved FLOP/s = FLOPs per token * tokens/s; on CUDA, MFU = achieved / the device's dense bf16 peak.

Writes OUT/train.md, OUT/train.json and OUT/train.png (peak memory and tokens/s against context).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import bench_common as bc
import torch
import torch.nn as nn

from mixret.models import VARIANTS, ModelConfig, build_model

ARCHS = {"flat": "masked-mixer (flat)", "expanded": "masked-mixer (expanded)", "heads": "masked-mixer (4 heads)",
         "kernel": "masked-mixer (kernel 4)", "hypermixer": "hypermixer", "llama": "llama"}
DEFAULT_ARCHS = "flat,expanded,heads,hypermixer,llama"
BASELINE = "llama"
MIXER = "flat"


# -- FLOPs ------------------------------------------------------------------------------------

def linear_weights(model: nn.Module) -> int:
    """Weights of every nn.Linear (the LM head included; embeddings and the mixing matrices not)."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))


def mixing_flops(cfg: ModelConfig, L: int) -> float:
    """Training FLOPs per token per layer of the token mixing at sequence length L (see the module docstring)."""
    D = cfg.d_model
    if cfg.arch == "masked-mixer":
        n_mats = 2 if cfg.mixer_expand else cfg.mixer_heads * cfg.mixer_kernel
        return 6 * L * D * n_mats / cfg.mixer_heads
    if cfg.arch == "llama":
        return 12 * L * D
    return 12 * cfg.hyper_dim * D


def flops_per_token(model: nn.Module, L: int) -> float:
    cfg = model.config
    return 6 * linear_weights(model) + cfg.n_layers * mixing_flops(cfg, L)


# -- one configuration, in a child process ----------------------------------------------------

def child(spec: dict) -> dict:
    device = bc.pick_device(spec["device"])
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")
    torch.manual_seed(0)
    L, B = spec["context"], spec["batch"]
    cfg = ModelConfig(**VARIANTS[ARCHS[spec["arch"]]], vocab_size=spec["vocab_size"], d_model=spec["d_model"],
                      n_layers=spec["layers"], context=L)
    model = build_model(cfg).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    ids = torch.randint(0, cfg.vocab_size, (B, L), device=device)

    def steps():
        for _ in range(spec["steps"]):
            with bc.autocast(device):
                loss = model(ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    try:
        first = bc.time_once(steps, device) / spec["steps"]  # also allocates: allow it twice the limit
        if spec["max_step_s"] and first > 2 * spec["max_step_s"]:
            return {"status": f"skipped: the first step took {first:.0f} s (limit {spec['max_step_s']:g} s)"}
        seconds = bc.best_time(steps, device, spec["repeats"], warmup=1 if device.type == "cuda" else 0)
    except torch.cuda.OutOfMemoryError:
        return {"status": "out of GPU memory"}
    step_s = seconds / spec["steps"]
    result = {"status": "ok", "step_s": step_s, "tok_s": B * L / step_s, "params": model.num_params(),
              "flops_per_token": flops_per_token(model, L)}
    if device.type == "cuda":
        result["peak_mib"] = bc.cuda_peak_mib(device)
    return result


# -- the sweep --------------------------------------------------------------------------------

def spec_for(args, device: torch.device, arch: str, L: int, B: int) -> dict:
    return {"arch": arch, "context": L, "batch": B, "vocab_size": args.vocab_size, "d_model": args.d_model,
            "layers": args.layers, "steps": args.steps, "repeats": args.repeats, "device": str(device),
            "threads": args.threads, "max_step_s": args.max_step_s if device.type == "cpu" else None}


def tiny_rss_mib(args, device: torch.device, arch: str) -> float:
    """Peak RSS of a child that trains a tiny model of this architecture for one step: the interpreter, torch
    and the kernels the architecture touches, without its data. Subtracted from the CPU measurements."""
    spec = {**spec_for(args, device, arch, 8, 1), "vocab_size": 16, "d_model": 8, "layers": 1, "steps": 1,
            "repeats": 1, "max_step_s": None}
    result = bc.run_child(__file__, spec)
    if "max_rss_mib" not in result:
        raise SystemExit(f"the baseline child ({ARCHS[arch]}, d_model 8) failed: {result['status']}")
    return result["max_rss_mib"]


def estimate_step(history: list[tuple[int, float]], L: int, tokens: int) -> float:
    """Seconds a step of `tokens` tokens at context L should take, from the (context, seconds per token) measured
    so far: the time per token extrapolated linearly in L from the last two contexts (never below the last)."""
    if not history:
        return 0.0
    L1, t1 = history[-1]
    t = t1
    if len(history) > 1:
        L0, t0 = history[-2]
        t = max(t1, t1 + (t1 - t0) / (L1 - L0) * (L - L1))
    return t * tokens


def sweep(args, device: torch.device) -> list[dict]:
    """Every context in turn, every architecture at each context (so that the ones compared are measured
    close together in time)."""
    peak = bc.peak_flops(device)
    base_rss = {arch: tiny_rss_mib(args, device, arch) if device.type == "cpu" else 0.0 for arch in args.archs}
    history = {arch: [] for arch in args.archs}  # arch -> [(context, seconds per token)] measured so far
    rows = []
    for L in args.contexts:
        B = max(1, args.tokens // L)
        for arch in args.archs:
            row = {"arch": arch, "variant": ARCHS[arch], "context": L, "batch": B}
            estimate = estimate_step(history[arch], L, B * L)
            if device.type == "cpu" and args.max_step_s and estimate > args.max_step_s:
                row["status"] = f"skipped: a step would take over {estimate:.0f} s (limit {args.max_step_s:g} s)"
            else:
                result = bc.run_child(__file__, spec_for(args, device, arch, L, B), timeout=args.child_timeout)
                row.update(result)
                if row.get("status") == "ok":
                    if device.type == "cpu":
                        row["peak_mib"] = result["max_rss_mib"] - base_rss[arch]
                        row["baseline_rss_mib"] = base_rss[arch]
                    history[arch].append((L, row["step_s"] / (B * L)))
                    row["gflop_s"] = row["flops_per_token"] * row["tok_s"] / 1e9
                    row["mfu"] = row["gflop_s"] * 1e9 / peak if peak else None
            rows.append(row)
            ok = row.get("status") == "ok"
            print(f"{ARCHS[arch]} @ {L}: " + (f"{row['tok_s']:,.0f} tok/s, {row['peak_mib']:,.0f} MiB" if ok
                                              else row["status"]), flush=True)
    add_ratios(rows)
    order = {arch: i for i, arch in enumerate(args.archs)}
    return sorted(rows, key=lambda r: (order[r["arch"]], r["context"]))


def add_ratios(rows: list[dict]) -> None:
    """speed_x: tokens/s over the baseline's at the same context; memory_x: peak memory over the baseline's."""
    base = {r["context"]: r for r in rows if r["arch"] == BASELINE and r.get("status") == "ok"}
    for r in rows:
        b = base.get(r["context"])
        if r.get("status") == "ok" and b is not None:
            r["speed_x"] = r["tok_s"] / b["tok_s"]
            r["memory_x"] = r["peak_mib"] / b["peak_mib"] if b["peak_mib"] > 0 else None


def side_by_side(rows: list[dict]) -> list[dict]:
    """The flat mixer and the baseline per context, from the same run."""
    by = {(r["arch"], r["context"]): r for r in rows if r.get("status") == "ok"}
    out = []
    for L in sorted({r["context"] for r in rows}):
        m, b = by.get((MIXER, L)), by.get((BASELINE, L))
        if m and b:
            out.append({"context": L, "mixer_tok_s": m["tok_s"], "base_tok_s": b["tok_s"],
                        "speed": m["tok_s"] / b["tok_s"], "mixer_mib": m["peak_mib"], "base_mib": b["peak_mib"],
                        "memory": b["peak_mib"] / m["peak_mib"] if m["peak_mib"] > 0 else None,
                        "mixer_gflop_s": m["gflop_s"], "base_gflop_s": b["gflop_s"],
                        "mixer_mfu": m["mfu"], "base_mfu": b["mfu"]})
    return out


def plot(rows: list[dict], path: Path, title: str) -> None:
    plt = bc.pyplot()
    fig, (ax_mem, ax_speed) = plt.subplots(1, 2, figsize=(11, 4.2))
    for arch in dict.fromkeys(r["arch"] for r in rows):
        ok = [r for r in rows if r["arch"] == arch and r.get("status") == "ok"]
        if ok:
            xs = [r["context"] for r in ok]
            ax_mem.plot(xs, [r["peak_mib"] for r in ok], marker="o", label=ARCHS[arch])
            ax_speed.plot(xs, [r["tok_s"] for r in ok], marker="o", label=ARCHS[arch])
    for ax, label in ((ax_mem, "peak memory (MiB)"), (ax_speed, "training tokens / s")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    ax_mem.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    bc.save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    bc.add_common_args(parser, "train")
    parser.add_argument("--archs", default=DEFAULT_ARCHS, help=f"comma-separated, from {','.join(ARCHS)}")
    parser.add_argument("--contexts", default=None,
                        help="comma-separated sequence lengths (default: 128,512,2048,4096,8192)")
    parser.add_argument("--d-model", type=int, default=None, help="width of every model (default: 256 CPU, 512 GPU)")
    parser.add_argument("--layers", type=int, default=None, help="blocks of every model (default: 4 CPU, 8 GPU)")
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--tokens", type=int, default=None,
                        help="tokens per step, batch = tokens // context (default: 2048 CPU, 65536 GPU)")
    parser.add_argument("--steps", type=int, default=None, help="steps per timed repeat (default: 1 CPU, 10 GPU)")
    parser.add_argument("--max-step-s", type=float, default=10.0, help="CPU: skip contexts whose step is slower")
    parser.add_argument("--child-timeout", type=float, default=600.0, help="seconds before a child is stopped")
    args = parser.parse_args()
    device = bc.setup(args)
    gpu = device.type == "cuda"
    if args.quick:
        args.contexts, args.vocab_size, args.repeats = args.contexts or "32,64", 256, 1
        args.d_model, args.layers, args.tokens, args.steps = args.d_model or 32, args.layers or 1, 64, 1
    args.contexts = args.contexts or "128,512,2048,4096,8192"
    args.d_model = args.d_model or (512 if gpu else 256)
    args.layers = args.layers or (8 if gpu else 4)
    args.tokens = args.tokens or (65536 if gpu else 2048)
    args.steps = args.steps or (10 if gpu else 1)
    args.archs = [a.strip() for a in args.archs.split(",") if a.strip()]
    unknown = [a for a in args.archs if a not in ARCHS]
    if unknown:
        parser.error(f"unknown arch(s) {unknown}; expected names from {', '.join(ARCHS)}")
    args.contexts = sorted(int(c) for c in args.contexts.split(","))

    info = bc.machine_info(device)
    rows = sweep(args, device)
    info = bc.finish_info(info)
    precision = "bf16 autocast" if gpu else "fp32"
    memory = ("CUDA max_memory_allocated" if gpu else "max RSS of the child minus that of a child that trained a "
              "tiny model (d_model 8, 1 layer, context 8) of the same architecture for one step (interpreter, "
              "torch and kernels: the `baseline_rss_mib` in the JSON)")
    intro = (f"Forward + backward + AdamW step on random tokens; d_model={args.d_model}, layers={args.layers}, "
             f"vocab={args.vocab_size}, {args.tokens} tokens per step (batch = tokens // context, at least 1), "
             f"{precision}, best of {args.repeats} x {args.steps} step(s) per configuration, each configuration "
             f"in a fresh process. Peak memory: {memory}. `speed x llama` = tokens/s over llama's at the same "
             f"context; `memory x llama` = peak memory over llama's. Model FLOPs per token as in "
             f"docs/benchmarks.md; MFU against the dense bf16 peak (GPU only).")
    cols = [("variant", "variant"), ("context", "context"), ("batch", "batch"), ("tok_s", "tokens/s"),
            ("step_s", "s/step"), ("peak_mib", "peak MiB"), ("gflop_s", "GFLOP/s"), ("speed_x", "speed x llama"),
            ("memory_x", "memory x llama"), ("status", "status")]
    if gpu:
        cols.insert(7, ("mfu", "MFU"))
    pair = side_by_side(rows)
    pair_cols = [("context", "context"), ("mixer_tok_s", "flat tok/s"), ("base_tok_s", "llama tok/s"),
                 ("speed", "flat / llama speed"), ("mixer_mib", "flat MiB"), ("base_mib", "llama MiB"),
                 ("memory", "llama / flat memory"), ("mixer_gflop_s", "flat GFLOP/s"),
                 ("base_gflop_s", "llama GFLOP/s")]
    if gpu:
        pair_cols += [("mixer_mfu", "flat MFU"), ("base_mfu", "llama MFU")]
    text = bc.write_report(
        args.out, "train", "Training throughput and peak memory", info, intro,
        [("Flat masked mixer against llama", bc.markdown_table(pair, pair_cols)),
         ("Every architecture", bc.markdown_table(rows, cols)),
         ("Memory against context", "![peak memory and tokens/s against context](train.png)")],
        {"args": {k: v for k, v in vars(args).items() if k not in ("out", "child")}, "rows": rows,
         "flat_vs_llama": pair})
    plot(rows, args.out / "train.png", f"d_model={args.d_model}, layers={args.layers}, {args.tokens} tokens/step, "
                                       f"{precision}, {info['gpu'] or info['cpu']}")
    print(text)


if __name__ == "__main__":
    bc.main_or_child(child, main)
