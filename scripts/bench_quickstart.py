"""The main job as a user runs it: `mixret quickstart`, its tables copied into the published results.

    python scripts/bench_quickstart.py [--out docs/bench/] [--work quickstart-bench] [QUICKSTART OPTIONS ...]

Runs `mixret quickstart --out WORK` with the options given after the script's own (for example
`--baseline DIR_OR_NAME`, `--budget-minutes 42`), then writes OUT/quickstart.md (the machine, the command and
the quickstart's own results.md) and OUT/quickstart.json (the machine, the command and its results.json).
Run it with nothing else on the machine: the quickstart's training is budgeted by wall-clock.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import bench_common as bc
import torch

from mixret.io import atomic_write_text, write_json


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("docs/bench"), help="folder for quickstart.md/.json")
    parser.add_argument("--work", type=Path, default=Path("quickstart-bench"), help="the quickstart's --out")
    parser.add_argument("--name", default="quickstart", help="file stem of the report (default: quickstart)")
    args, rest = parser.parse_known_args()
    info = bc.machine_info(torch.device("cpu"))
    cmd = [sys.executable, "-m", "mixret.cli", "quickstart", "--out", str(args.work), *rest]
    subprocess.run(cmd, check=True)
    info = bc.finish_info(info)
    shown = "mixret quickstart " + " ".join(["--out", str(args.work), *rest])
    results = json.loads((args.work / "results.json").read_text())
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / f"{args.name}.json", {"machine": info, "command": shown, "results": results})
    atomic_write_text(args.out / f"{args.name}.md",
                      f"# `{shown}`\n\nMachine: {bc.describe(info)}\n\n"
                      + (args.work / "results.md").read_text())
    print(f"written: {args.out / (args.name + '.md')}, {args.out / (args.name + '.json')}")


if __name__ == "__main__":
    main()
