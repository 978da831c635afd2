"""Kill rate per module from `mutmut results --all true` (read on stdin), for docs/mutation.md.

A mutant counts as killed when a test failed (or timed out) with it; `no tests` means no
selected test ran the mutated function, and counts against the rate like a survivor.
Mutants not yet checked are listed but left out of the rate.
"""

from __future__ import annotations

import re
import sys
from collections import Counter, defaultdict

LINE = re.compile(r"^\s*(?P<name>[\w.]+)\.x(?:ǁ|_)\S*__mutmut_\d+: (?P<status>.+?)\s*$")


def main() -> int:
    per_module: dict[str, Counter] = defaultdict(Counter)
    for line in sys.stdin:
        match = LINE.match(line)
        if match:
            per_module[match["name"]][match["status"]] += 1
    print("| module | mutants | killed | survived | no tests | timeout | not checked | kill rate |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    totals: Counter = Counter()
    for module in sorted(per_module):
        c = per_module[module]
        totals.update(c)
        print(row(module, c))
    print(row("**all**", totals))
    return 0


def row(module: str, c: Counter) -> str:
    killed = c["killed"] + c["timeout"]
    checked = sum(c.values()) - c["not checked"] - c["skipped"]
    rate = f"{100 * killed / checked:.0f} %" if checked else "-"
    return (f"| {module} | {sum(c.values())} | {c['killed']} | {c['survived']} | {c['no tests']} | {c['timeout']} "
            f"| {c['not checked']} | {rate} |")


if __name__ == "__main__":
    sys.exit(main())
