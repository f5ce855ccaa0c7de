"""Turn a pytest-benchmark JSON file into the goal table of issues 4 and 12 (ratios within one run).

    pytest benches/ --benchmark-only --bench-large --benchmark-json=bench.json
    python benches/goals.py bench.json [--size 1GiB]      # the goal table
    python benches/goals.py bench.json --ladder           # every row at every size (GB/s)
"""

from __future__ import annotations

import argparse
import json
from typing import Any, Dict, List, Optional, Tuple

# (what, group, ours, peer, goal ratio, or None for an absolute check)
GOALS: List[Tuple[str, str, str, str, Optional[float]]] = [
    ("simple_checksum vs xxh3_64", "checksum", "simple_checksum", "xxhash xxh3_64", 0.85),
    ("simple_checksum vs the straightforward loop", "checksum", "simple_checksum",
     "straightforward loop (_naive_checksum)", 5.0),
    ("dirty_pages (1% dirty) vs memcmp", "compare (1% dirty)", "dirty_pages", "memcmp: bytes == (equal states)", 0.9),
    ("DeltaSnapshot.create vs the straightforward create", "delta create", "DeltaSnapshot.create digest=None",
     "straightforward create (naive loops)", 1.5),
    ("DeltaSnapshot.create (default digest) vs the straightforward create", "delta create",
     "DeltaSnapshot.create (default xxh3_128_tree digest)", "straightforward create (naive loops)", 1.5),
    # issue 12: the peer is a page-by-page memcmp + memcpy loop in C at -O2 (not the crate's byte loops).
    ("create (default digest, 1% dirty) vs the compiled C create", "delta create",
     "DeltaSnapshot.create (default xxh3_128_tree digest)",
     "straightforward compiled create (C memcmp+memcpy loop, cc -O2)", 2.0),
    ("create (default digest, 10% dirty) vs the compiled C create", "delta create 10% dirty",
     "DeltaSnapshot.create (default xxh3_128_tree digest)",
     "straightforward compiled create (C memcmp+memcpy loop, cc -O2)", 2.0),
    # The same create given the base's page fingerprints: it reads the new state alone.
    ("create with the base's page fingerprints (1% dirty) vs the compiled C create", "delta create",
     "DeltaSnapshot.create (default digest) given the base's page fingerprints (reads new only)",
     "straightforward compiled create (C memcmp+memcpy loop, cc -O2)", None),
    ("create with the base's page fingerprints (10% dirty) vs the compiled C create", "delta create 10% dirty",
     "DeltaSnapshot.create (default digest) given the base's page fingerprints (reads new only)",
     "straightforward compiled create (C memcmp+memcpy loop, cc -O2)", None),
    ("create with the base's page fingerprints (1% dirty) vs create comparing both states", "delta create",
     "DeltaSnapshot.create (default digest) given the base's page fingerprints (reads new only)",
     "DeltaSnapshot.create (default xxh3_128_tree digest)", None),
    # What bounds a create that compares the two states: it reads both; the C loop
    # already runs near this floor on a machine where one core saturates memory.
    ("create (default digest, 1% dirty) vs reading both states once", "delta create",
     "DeltaSnapshot.create (default xxh3_128_tree digest)",
     "memory floor: read both states once (XXH3-64 of each, one thread)", None),
    ("compiled C create (1% dirty) vs reading both states once", "delta create",
     "straightforward compiled create (C memcmp+memcpy loop, cc -O2)",
     "memory floor: read both states once (XXH3-64 of each, one thread)", None),
    # At 0.5x or more here, twice the C create is as fast as our compare alone on both
    # threads: no create that compares the two states can reach it, whatever it hashes.
    ("compiled C create (1% dirty) vs comparing both states on both threads", "delta create",
     "straightforward compiled create (C memcmp+memcpy loop, cc -O2)",
     "memory floor: compare both states, both threads (dirty_pages alone)", None),
    ("create (default digest, 1% dirty) vs comparing both states on both threads", "delta create",
     "DeltaSnapshot.create (default xxh3_128_tree digest)",
     "memory floor: compare both states, both threads (dirty_pages alone)", None),
    ("create (default digest, 10% dirty) vs reading both states once", "delta create 10% dirty",
     "DeltaSnapshot.create (default xxh3_128_tree digest)",
     "memory floor: read both states once (XXH3-64 of each, one thread)", None),
    ("apply, checksum-only, vs simple_checksum", "delta apply", "DeltaSnapshot.apply checksum-only (digest=None)",
     "simple_checksum (same state)", 0.75),
    # issue 12: 0.8x with the default (tree) digest, both threads busy in both.
    ("apply, default digest (xxh3_128_tree), vs simple_checksum", "delta apply",
     "DeltaSnapshot.apply default (xxh3_128_tree verified)", "simple_checksum (same state)", 0.8),
    ("apply, plain xxh3_128 digest, vs simple_checksum", "delta apply", "DeltaSnapshot.apply xxh3_128 verified",
     "simple_checksum (same state)", 0.5),
    ("apply verified (10% dirty, 64 bytes a page) vs numpy scatter + one XXH3-128", "delta apply 10% dirty",
     "DeltaSnapshot.apply default (xxh3_128_tree verified)", "numpy scatter + one XXH3-128 of the result", 1.0),
    ("apply verified (10% of pages rewritten) vs numpy scatter + one XXH3-128", "delta apply 10% rewritten",
     "DeltaSnapshot.apply default (xxh3_128_tree verified)", "numpy scatter + one XXH3-128 of the result", 1.0),
    ("simple_compress random vs the straightforward loop", "compress random", "simple_compress",
     "straightforward loop (_naive_rle_compress)", 3.0),
    ("simple_compress zeros vs the straightforward loop", "compress zeros", "simple_compress",
     "straightforward loop (_naive_rle_compress)", 3.0),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("json_file")
    parser.add_argument("--size", default="1GiB", help="ladder size label to report (default 1GiB)")
    parser.add_argument("--ladder", action="store_true", help="print the GB/s ladder instead of the goals")
    args = parser.parse_args()
    with open(args.json_file) as f:
        data = json.load(f)
    if args.ladder:
        ladder(data["benchmarks"])
        return
    gbps: Dict[Tuple[str, str], float] = {}
    for bench in data["benchmarks"]:
        gbps[(bench["group"], bench["name"])] = bench["extra_info"].get("GB/s", 0.0)
    print(f"| goal ({args.size}) | ours GB/s | peer GB/s | ratio | goal | met |")
    print("|---|---|---|---|---|---|")
    for what, group, ours, peer, goal in GOALS:
        key = f"{group} {args.size}"
        a, b = gbps.get((key, ours)), gbps.get((key, peer))
        if a is None or b is None:
            print(f"| {what} | - | - | - | {goal} | not measured |")
            continue
        ratio = a / b
        if goal is None:  # context, not a goal
            print(f"| {what} | {a:.2f} | {b:.2f} | {ratio:.2f}x | - | - |")
            continue
        print(f"| {what} | {a:.2f} | {b:.2f} | {ratio:.2f}x | >= {goal}x | {'yes' if ratio >= goal else 'NO'} |")
    call = gbps.get(("checksum 4KiB call 4KiB", "simple_checksum"))
    if call:
        per_call_us = 4096 / (call * 1e9) * 1e6
        print(f"| simple_checksum on 4 KiB, per call | {per_call_us:.2f} us | | | <= 1 us | "
              f"{'yes' if per_call_us <= 1 else 'NO'} |")
    for name in ("simple_checksum", "simple_checksum threads=1"):
        value = gbps.get((f"checksum {args.size}", name))
        if value:
            print(f"| {name} ({args.size}) | {value:.2f} | | | stretch: 40 GB/s on 2 threads | "
                  f"{'yes' if value >= 40 else 'no'} |")
    for bench in data["benchmarks"]:
        info = bench["extra_info"]
        if "peak_rss_growth_MiB" in info and bench["name"].endswith(f"{_mib(args.size)} MiB states"):
            growth, dirty = info["peak_rss_growth_MiB"], info["dirty_MiB"]
            print(f"| create over two {args.size} states: peak RSS growth | {growth} MiB | (dirty {dirty} MiB) | | "
                  f"<= 64 MiB + dirty | {'yes' if growth <= 64 + dirty else 'NO'} |")


def _mib(label: str) -> int:
    units = {"KiB": 1 / 1024, "MiB": 1, "GiB": 1024}
    return int(float(label[:-3]) * units[label[-3:]])


def ladder(benchmarks: List[Dict[str, Any]]) -> None:
    """One row per (group, name), one column per size, in the order the run made them."""
    sizes: List[str] = []
    rows: Dict[Tuple[str, str], Dict[str, float]] = {}
    for bench in benchmarks:
        info = bench["extra_info"]
        if "GB/s" not in info:
            continue
        group, _, size = bench["group"].rpartition(" ")
        if size not in sizes:
            sizes.append(size)
        rows.setdefault((group, bench["name"]), {})[size] = info["GB/s"]
    sizes.sort(key=_mib)
    print("| kernel | " + " | ".join(sizes) + " |")
    print("|---" * (len(sizes) + 1) + "|")
    for (group, name), cells in rows.items():
        print(f"| {group}: {name} | " + " | ".join(f"{cells[s]:.2f}" if s in cells else "-" for s in sizes) + " |")


if __name__ == "__main__":
    main()
