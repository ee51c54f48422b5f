"""alkey's own CPU per call, this tree against an earlier revision, side by side.

    python -m benchmarks.cpu                      # against BASELINE; writes docs/cpu.md, .png
    python -m benchmarks.cpu --against <git-rev>  # against any revision
    python -m benchmarks.cpu --rounds 3 --no-write

Why a separate run: a refactoring must not make the calls users make on every request
slower, and that can only be told by running both versions on the same machine at the
same time. Each round starts one worker process per tree (``benchmarks/cpu_worker.py``,
the revision's ``src`` exported with ``git archive``), alternating which goes first, on
one embedded Redis; the medians over rounds are compared as a ratio, because absolute
times on a shared machine drift.

Measured per call, as CPU time of the application's process (the Redis server's is not
counted): a key for 1, 10 and 1000 loaded instances (one round trip each), and alkey's
share of a one-row and of a 100-row ORM commit and of a read-only transaction (begin, one
SELECT, commit): its CPU with alkey bound, minus the same without alkey, in the same
process.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from alkey.testing import EmbeddedRedis

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
WORKER = Path(__file__).resolve().parent / "cpu_worker.py"

#: The last revision before the CPU work of issue #14 (the instance state framed rather
#: than hashed, instances encoded a run at a time, answers kept for the session events,
#: reads skipped at the cursor): the "before" of its CPU comparison.
BASELINE = "e783d53"


def export(revision: str, into: Path) -> Path:
    """The ``src`` directory of ``revision``, exported into the new directory ``into``."""
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", "--format=tar", revision, "src"],
        check=True,
        capture_output=True,
    ).stdout
    target = into
    target.mkdir()
    archive_path = into / "src.tar"
    archive_path.write_bytes(archive)
    with tarfile.open(archive_path) as tar:
        tar.extractall(target, filter="data")
    return target / "src"


def run_worker(src: Path, redis_url: str, calls: int) -> dict[str, float]:
    env = dict(os.environ, PYTHONPATH=str(src))
    output = subprocess.run(
        [sys.executable, str(WORKER), redis_url, str(calls)],
        check=True,
        capture_output=True,
        text=True,
        env=env,
    ).stdout
    answer = json.loads(output)
    if not answer["alkey"].startswith(str(src)):
        raise RuntimeError(f"the worker imported {answer['alkey']}, not the tree in {src}")
    cpu: dict[str, float] = answer["cpu"]
    return cpu


def compare(
    against: str, rounds: int, calls: int, tree: str | None = None
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    before: dict[str, list[float]] = {}
    after: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as scratch, EmbeddedRedis() as server:
        base = export(against, Path(scratch) / "against")
        current = ROOT / "src" if tree is None else export(tree, Path(scratch) / "tree")
        trees = [(base, before), (current, after)]
        for round_number in range(rounds):
            order = trees if round_number % 2 == 0 else trees[::-1]
            for src, into in order:
                for name, seconds in run_worker(src, server.url, calls).items():
                    into.setdefault(name, []).append(seconds)
    return before, after


def report(
    against: str, label: str, before: dict[str, list[float]], after: dict[str, list[float]]
) -> str:
    lines = [
        f"| CPU per call (µs) | before ({against}) | after ({label}) | after / before |",
        "|---|---:|---:|---:|",
    ]
    for name in before:
        old, new = statistics.median(before[name]), statistics.median(after[name])
        ratio = f"{new / old:.2f}" if old > 0 else "n/a"
        lines.append(f"| {name} | {old * 1e6:.1f} | {new * 1e6:.1f} | {ratio} |")
    return "\n".join(lines) + "\n"


def plot(
    against: str, label: str, before: dict[str, list[float]], after: dict[str, list[float]]
) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - the bench extra installs it
        print("matplotlib is not installed: no plot", file=sys.stderr)
        return
    names = [name for name in before if "no alkey" not in name]
    figure, axis = plt.subplots(figsize=(7, 3.2))
    positions = range(len(names))
    width = 0.38
    axis.barh(
        [p + width / 2 for p in positions],
        [statistics.median(before[n]) * 1e6 for n in names],
        width,
        label=f"before ({against})",
    )
    axis.barh(
        [p - width / 2 for p in positions],
        [statistics.median(after[n]) * 1e6 for n in names],
        width,
        label=f"after ({label})",
    )
    axis.set_yticks(list(positions), names)
    axis.set_xlabel("alkey CPU per call (µs, median of rounds)")
    axis.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(DOCS / "cpu.png", dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cpu", description=__doc__)
    parser.add_argument("--against", default=BASELINE, help="git revision to compare with")
    parser.add_argument("--tree", help="git revision to measure instead of the working tree")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--calls", type=int, default=400, help="calls per batch")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)
    before, after = compare(args.against, args.rounds, args.calls, args.tree)
    label = args.tree or "this tree"
    table = report(args.against, label, before, after)
    print(table)
    if not args.no_write:
        DOCS.mkdir(exist_ok=True)
        (DOCS / "cpu.md").write_text(
            "# CPU per call, before and after\n\n"
            "Generated by `python -m benchmarks.cpu` (see its docstring): medians over "
            f"{args.rounds} interleaved rounds, each tree in its own process on one "
            "embedded Redis and SQLite. The ratio is what to read; absolute times drift "
            "on shared machines.\n\n" + table + "\n![CPU per call](cpu.png)\n",
            encoding="utf-8",
        )
        plot(args.against, label, before, after)
    return 0


if __name__ == "__main__":
    sys.exit(main())
