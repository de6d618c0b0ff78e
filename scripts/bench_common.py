"""Shared pieces of the benchmark scripts: device and threads, timing, machine facts, markdown tables,
report files, plots, and child processes that measure one configuration each (so that peak memory is
per configuration, not cumulative).

A script that measures in children defines `child(spec) -> dict` and calls `main_or_child(child, main)`:
run with `--child JSON` it measures that one spec and prints the result (with its peak memory) as the
last line; otherwise it runs `main()`, which calls `run_child(__file__, spec)` per configuration.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

from mixret.autocast import autocast  # noqa: F401  (bc.autocast: bf16 on CUDA, as in training)
from mixret.io import atomic_write_text, write_json

RESULT_PREFIX = "BENCH_RESULT "
REPO_ROOT = Path(__file__).resolve().parent.parent
# dense bf16 tensor-core peak in FLOP/s, by the first substring of torch.cuda.get_device_name() that matches
BF16_PEAK = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989.4e12, "H200": 989.4e12, "A100": 312e12,
             "L40S": 362e12, "L4": 121e12}


# -- arguments, device, threads ---------------------------------------------------------------

def add_common_args(parser: argparse.ArgumentParser, name: str) -> None:
    """--out, --threads, --repeats, --device, --quick and the hidden --child."""
    parser.add_argument("--out", type=Path, default=Path("docs/bench"), help=f"folder for {name}.md/.json/.png")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--repeats", type=int, default=3, help="time each measurement this often, keep the best")
    parser.add_argument("--device", default="auto", help="auto (the GPU if there is one), cpu or cuda")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, seconds in all (a smoke test)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    return device


def setup(args) -> torch.device:
    """Apply --threads and pick the device (TF32 for any fp32 matmul left on CUDA)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")
    return device


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- timing -----------------------------------------------------------------------------------

def time_once(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds one call of fn takes, with the device synchronised before and after."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def best_time(fn: Callable[[], object], device: torch.device, repeats: int = 3, warmup: int = 1) -> float:
    """Best of `repeats` timed calls after `warmup` untimed ones, in seconds."""
    for _ in range(warmup):
        fn()
    return min(time_once(fn, device) for _ in range(max(1, repeats)))


# -- peak memory ------------------------------------------------------------------------------

def max_rss_mib() -> float:
    """This process's peak resident set size so far, MiB (Linux reports KiB)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


def cuda_peak_mib(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**20


# -- child processes --------------------------------------------------------------------------

def main_or_child(child: Callable[[dict], dict], main: Callable[[], None]) -> None:
    """Run `child` on the spec after --child (printing its result), else `main()`."""
    if "--child" not in sys.argv:
        main()
        return
    spec = json.loads(sys.argv[sys.argv.index("--child") + 1])
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    result = child(spec)
    result["max_rss_mib"] = max_rss_mib()
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def run_child(script: str | os.PathLike, spec: dict, timeout: float | None = None) -> dict:
    """Run `script --child SPEC` in a fresh Python and return its result dict; on a crash or a timeout,
    {"status": why}."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, str(script), "--child", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"status": f"timed out after {timeout:.0f} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    if proc.returncode == -9:
        return {"status": "killed (out of memory?)"}
    last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return {"status": f"failed (exit {proc.returncode}): {last[:200]}"}


# -- machine facts ----------------------------------------------------------------------------

def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: torch.device) -> dict:
    """Date, CPU, threads, torch version, GPU and the load average when the benchmark starts."""
    return {
        "date": datetime.date.today().isoformat(),
        "cpu": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "device": device.type,
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "load_start": round(os.getloadavg()[0], 2),
    }


def finish_info(info: dict) -> dict:
    """Add the load average at the end of the run."""
    return {**info, "load_end": round(os.getloadavg()[0], 2)}


def describe(info: dict) -> str:
    gpu = info["gpu"] or "no GPU"
    return (f"{info['date']}; {gpu}; CPU {info['cpu']} ({info['cpu_cores']} cores), {info['threads']} torch "
            f"thread(s); torch {info['torch']}; 1-minute load average {info['load_start']} at the start, "
            f"{info.get('load_end', '?')} at the end.")


def peak_flops(device: torch.device) -> float | None:
    """The device's dense bf16 peak FLOP/s, when known (CUDA only)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in BF16_PEAK.items() if k in name), None)


# -- tables and files -------------------------------------------------------------------------

def fmt(value, digits: int = 3) -> str:
    """A table cell: floats to `digits` significant digits (thousands grouped), None as '-'."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if value != value:
            return "-"
        if abs(value) >= 10 ** digits:
            return f"{value:,.0f}"
        return f"{value:.{digits}g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def markdown_table(rows: Sequence[dict], columns: Sequence[tuple]) -> str:
    """rows of dicts -> a markdown table of the given (key, header) or (key, header, digits) columns;
    numbers right-aligned, to 3 significant digits unless the column says otherwise."""
    columns = [(c[0], c[1], c[2] if len(c) > 2 else 3) for c in columns]
    numeric = [any(isinstance(r.get(k), (int, float)) and not isinstance(r.get(k), bool) for r in rows)
               for k, _, _ in columns]
    lines = ["| " + " | ".join(h for _, h, _ in columns) + " |",
             "|" + "|".join("---:" if n else "---" for n in numeric) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(fmt(r.get(k), d) for k, _, d in columns) + " |")
    return "\n".join(lines)


def write_report(out: Path, name: str, title: str, info: dict, intro: str, sections: Sequence[tuple[str, str]],
                 data: dict) -> str:
    """Write OUT/NAME.md (title, machine line, intro, one '###' section per table) and OUT/NAME.json
    (machine facts plus `data`); returns the markdown."""
    parts = [f"## {title}", "", describe(info), "", intro.strip(), ""]
    for heading, body in sections:
        parts += [f"### {heading}", "", body.strip(), ""]
    text = "\n".join(parts)
    atomic_write_text(out / f"{name}.md", text)
    write_json(out / f"{name}.json", {"machine": info, **data})
    return text


def save_figure(fig, path: Path) -> None:
    """Save a matplotlib figure as PNG via a temporary file and a rename."""
    import matplotlib.pyplot as plt
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110, bbox_inches="tight")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        plt.close(fig)


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def finetune_loop(minutes: float, **overrides):
    """`finetune`'s loop defaults, run for `minutes` of wall-clock rather than a number of steps, with no
    progress bar; `overrides` replace further fields (eval_every, ...)."""
    from mixret.training.finetune import FINETUNE_LOOP
    from mixret.training.loop import LoopConfig
    return LoopConfig(**{**FINETUNE_LOOP, "steps": None, "budget_minutes": minutes, "progress": False, **overrides})


def selection_pairs(path: str, size: int | None = None):
    """Pairs of `path` outside the bundled corpus: the first `size` (None: all) by a hash of the id, repeated
    queries dropped. The dev file's 1,277 such pairs are the selection pairs of the studies."""
    import hashlib

    from mixret.data import bundled_pairs_path, drop_repeated_queries, load_pairs
    bundled = {p.id for p in load_pairs(bundled_pairs_path())}
    pairs = [p for p in load_pairs(path) if p.id not in bundled]
    pairs.sort(key=lambda p: hashlib.blake2b(p.id.encode(), person=b"mixret-select").hexdigest())
    return drop_repeated_queries(pairs[:size])[0]
