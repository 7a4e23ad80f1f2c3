"""What a verb costs before it does anything: ``import ppvit`` and ``ppvit --help``, two source trees side by side.

    python benchmarks/bench_import.py --before /path/to/old/checkout/src [--reps 5]

Each command runs ``reps`` times in a fresh interpreter per tree, alternating trees, and the
best wall time of each is printed with the ratio old/new. ``-X importtime`` gives the
cumulative import time of the ``ppvit`` package itself.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

NEW = Path(__file__).resolve().parents[1] / "src"
COMMANDS = {
    "import ppvit": ["-c", "import ppvit"],
    "ppvit --help": ["-c", "import sys; sys.argv = ['ppvit', '--help']; from ppvit.cli import main; main()"],
}


def wall(src: Path, args: list[str]) -> float:
    env = {**os.environ, "PYTHONPATH": str(src)}
    start = time.perf_counter()
    subprocess.run([sys.executable, *args], env=env, check=False, capture_output=True)
    return time.perf_counter() - start


def package_import_us(src: Path) -> int:
    """Cumulative microseconds of ``import ppvit`` from ``-X importtime``."""
    env = {**os.environ, "PYTHONPATH": str(src)}
    err = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import ppvit"], env=env, capture_output=True, text=True
    ).stderr
    return int(re.search(r"\|\s*(\d+)\s*\|\s*ppvit\s*$", err, re.M).group(1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", type=Path, required=True, help="src/ folder of the old checkout")
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    # the old `ppvit --help` is the old module's: ppvit.cli was one module with main()
    for name, cmd in COMMANDS.items():
        best = {"before": float("inf"), "after": float("inf")}
        for _ in range(args.reps):
            best["before"] = min(best["before"], wall(args.before, cmd))
            best["after"] = min(best["after"], wall(NEW, cmd))
        b, a = best["before"], best["after"]
        print(f"{name:<14} before {b:.2f} s  after {a:.2f} s  ratio {b / a:.1f}x")
    before, after = package_import_us(args.before), package_import_us(NEW)
    print(f"-X importtime, ppvit cumulative: before {before / 1e6:.2f} s  after {after / 1e6:.3f} s")


if __name__ == "__main__":
    main()
