"""Print the benchmarks as ns/op with ratios, and the churn targets.

    python benchmarks/ratios.py                       # runs bench_churn.py, then prints
    python benchmarks/ratios.py --save churn.json -- --benchmark-min-rounds=50   # keep the JSON; extra pytest args
    python benchmarks/ratios.py --json results.json   # reads a --benchmark-json file

Every figure is the median of the rounds (machines here are shared and
noisy; the minimum is shown beside it, with the ratio of minimums as a
second opinion). Ratios compare medians from the same run: within a group, each row is divided by the group's yardstick
(``numpy.empty`` of the same size in the churn groups; the row marked
``yardstick`` in extra_info elsewhere). Rows that time several ops per call
(``ops_per_call`` in extra_info) are reported per op.

Targets, as ratios of medians in one run:

- pool churn, 4 KiB: BufferPool.alloc <= 3x numpy.empty (aim: 2x);
- BufferPool.alloc of a repeated request <= 1.1x a prepared BufferPool.allocator();
- BufferPool.alloc_batch of 64 x 4 KiB, per buffer, <= 2.5x numpy.empty;
- device alloc, 4 KiB: Device.alloc_buffer <= 6x numpy.zeros;
- pool hit with 100k live buffers <= 1.25x the hit with 100 live.

Exit status: 0, or with ``--strict`` 1 when a target is missed (2 when a
target's rows are missing from the results).
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
CHURN_4K = "churn-4KiB"


def run_benchmarks(extra_args, save=None):
    """Run bench_churn.py with pytest-benchmark and return the parsed JSON (kept at ``save`` if given)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = save.resolve() if save else Path(tmp) / "churn.json"
        cmd = [
            sys.executable, "-m", "pytest", str(HERE / "bench_churn.py"), "--benchmark-only",
            f"--benchmark-json={out}", "--benchmark-columns=min,median,rounds,iterations", "-q", *extra_args,
        ]
        print("$", " ".join(cmd), flush=True)
        status = subprocess.run(cmd, check=False, cwd=HERE.parent).returncode
        if status != 0 or not out.exists():
            sys.exit(f"pytest exited with status {status}; no results to read")
        return json.loads(out.read_text())


class Row:
    """One benchmark of the JSON, reduced to what the tables need."""

    def __init__(self, bench):
        info = bench.get("extra_info", {})
        per_call = info.get("ops_per_call", 1)
        stats = bench["stats"]
        self.group = bench.get("group") or "(no group)"
        self.name = bench["name"]
        self.impl = info.get("impl", self.name)
        self.info = info
        self.median_ns = stats["median"] / per_call * 1e9
        self.min_ns = stats["min"] / per_call * 1e9
        self.rounds = stats["rounds"]

    @property
    def is_yardstick(self):
        if self.info.get("yardstick"):
            return True
        churn = self.group.startswith("churn-") or self.group == "pool-hit-breakdown"
        return churn and self.impl == "numpy.empty"

    @property
    def key(self):
        # Rows compare with the yardstick of the same N (stage-and-flush has one per N).
        return self.info.get("n")


def _fmt_ns(ns):
    return f"{ns:,.0f}" if ns >= 100 else f"{ns:.1f}"


def print_tables(rows):
    groups = {}
    for row in rows:
        groups.setdefault(row.group, []).append(row)
    for group in sorted(groups):
        members = sorted(groups[group], key=lambda r: (str(r.key), r.info.get("live", 0), r.median_ns))
        sticks = {r.key: r for r in members if r.is_yardstick}
        heading = group + ("  (x: ratio to the row marked *" + (" of the same N)" if len(sticks) > 1 else ")") if sticks else "")
        width = max(len(r.impl) for r in members)
        width = max(width, 14)
        print(f"\n{heading}")
        print(f"  {'':<{width}}  {'median ns/op':>13}  {'min ns/op':>11}  {'x median':>8}  {'x min':>7}  rounds")
        for r in members:
            stick = sticks.get(r.key)
            ratio = f"{r.median_ns / stick.median_ns:6.2f}x" if stick else ""
            min_ratio = f"{r.min_ns / stick.min_ns:6.2f}x" if stick else ""
            print(
                f"{'*' if r.is_yardstick else ' '} {r.impl:<{width}}  {_fmt_ns(r.median_ns):>13}  {_fmt_ns(r.min_ns):>11}  {ratio:>8}  {min_ratio:>7}"
                f"  {r.rounds}"
            )


def _find(rows, group, impl=None, **info):
    for r in rows:
        if r.group != group or impl is not None and r.impl != impl:
            continue
        if all(r.info.get(k) == v for k, v in info.items()):
            return r
    return None


def check_targets(rows):
    """Print the targets with pass/miss; return ``"pass"``, ``"miss"`` or ``"incomplete"``."""
    batch = next((r for r in rows if r.group == CHURN_4K and r.impl.startswith("BufferPool.alloc_batch")), None)
    checks = [
        ("pool churn 4 KiB: BufferPool.alloc / numpy.empty", 3.0, 2.0,
         _find(rows, CHURN_4K, "BufferPool.alloc"), _find(rows, CHURN_4K, "numpy.empty")),
        ("4 KiB: BufferPool.alloc / BufferPool.allocator()", 1.1, None,
         _find(rows, CHURN_4K, "BufferPool.alloc"), _find(rows, CHURN_4K, "BufferPool.allocator()")),
        ("4 KiB: alloc_batch per buffer / numpy.empty", 2.5, None,
         batch, _find(rows, CHURN_4K, "numpy.empty")),
        ("device alloc 4 KiB: Device.alloc_buffer / numpy.zeros", 6.0, None,
         _find(rows, CHURN_4K, "Device.alloc_buffer"), _find(rows, CHURN_4K, "numpy.zeros")),
        ("pool hit, 100k live / 100 live", 1.25, None,
         _find(rows, "pool-hit-live", live=100_000), _find(rows, "pool-hit-live", live=100)),
    ]
    if all(num is None and den is None for *_, num, den in checks):
        return "incomplete"  # not a churn run (e.g. bench_residency.py alone): nothing to check
    print("\ntargets (ratios of medians in this run)")
    outcome = "pass"
    for label, limit, aim, num, den in checks:
        if num is None or den is None:
            print(f"  {label:<56}     n/a  (not in these results)")
            outcome = "incomplete" if outcome == "pass" else outcome
            continue
        ratio = num.median_ns / den.median_ns
        verdict = "pass" if ratio <= limit else "MISS"
        aim_text = f", aim {aim:g}x {'met' if ratio <= aim else 'not met'}" if aim else ""
        print(f"  {label:<56} {ratio:6.2f}x  <= {limit:g}x: {verdict}{aim_text}"
              f"  (mins: {num.min_ns / den.min_ns:.2f}x)")
        if verdict == "MISS":
            outcome = "miss"
    for peer in ("torch.empty", "mlx.zeros+eval"):
        num, den = _find(rows, CHURN_4K, peer), _find(rows, CHURN_4K, "numpy.empty")
        if num and den:
            label = f"for reference: 4 KiB {peer} / numpy.empty"
            print(f"  {label:<56} {num.median_ns / den.median_ns:6.2f}x  (mins: {num.min_ns / den.min_ns:.2f}x)")
    return outcome


def main(argv=None):
    """Parse arguments, get results, print them; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, help="read this pytest-benchmark JSON instead of running the benchmarks")
    parser.add_argument("--save", type=Path, help="when running the benchmarks, keep their JSON here")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target is missed, 2 when one is missing")
    parser.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    args = parser.parse_args(argv)
    data = json.loads(args.json.read_text()) if args.json else run_benchmarks(args.pytest_args, args.save)
    rows = [Row(b) for b in data.get("benchmarks", [])]
    if not rows:
        print("no benchmarks in the results", file=sys.stderr)
        return 2
    machine = data.get("machine_info", {})
    cpu = machine.get("cpu", {})
    print(f"\n{cpu.get('brand_raw', machine.get('processor', '?'))}, {cpu.get('count', '?')} CPUs, "
          f"Python {machine.get('python_version', '?')}, {data.get('datetime', '')}")
    print_tables(rows)
    outcome = check_targets(rows)
    if not args.strict:
        return 0
    return {"pass": 0, "miss": 1, "incomplete": 2}[outcome]


if __name__ == "__main__":
    sys.exit(main())
