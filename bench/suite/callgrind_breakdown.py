#!/usr/bin/env python3
"""Instructions per operation, and where they go, from two callgrind runs of `lim_suite op`.

    callgrind_breakdown.py FAMILY KIND N PROFILE_AT_N PROFILE_AT_2N

Prints one Markdown table row: the difference of the two runs divided by N is exactly one
operation's instructions (start-up and set-up cancel out), in total and per function (self cost).
"""
import re
import subprocess
import sys

LINE = re.compile(r"^\s*([0-9,]+)\s+\([ 0-9.]+%\)\s+(\S.*)$")


def per_function(profile):
    out = subprocess.run(["callgrind_annotate", "--inclusive=no", "--threshold=100", profile],
                         check=True, capture_output=True, text=True).stdout
    total, funcs = 0, {}
    for line in out.splitlines():
        m = LINE.match(line)
        if not m:
            continue
        ir, what = int(m.group(1).replace(",", "")), m.group(2)
        if what.startswith("PROGRAM TOTALS"):
            total = ir
            continue
        name = re.sub(r"\s+\[.*$", "", what)        # the object file
        name = re.sub(r"^[^ :]*:", "", name, count=1)  # the source file ("???:" when unknown)
        funcs[name] = funcs.get(name, 0) + ir
    return total, funcs


def short(name):
    name = name.replace("lim::detail::", "").replace("(anonymous namespace)::", "")
    if "_Function_handler" in name:
        return "the op's lambda (the harness's call, with what it inlines)"
    depth, out = 0, ""
    for ch in name:  # drop argument lists and template arguments
        if ch in "(<":
            depth += 1
        elif ch in ")>":
            depth -= 1
        elif depth == 0:
            out += ch
    return out.strip()


def main():
    family, kind, n, a, b = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]
    ta, fa = per_function(a)
    tb, fb = per_function(b)
    per_op = (tb - ta) / n
    deltas = []
    for name in set(fa) | set(fb):
        d = (fb.get(name, 0) - fa.get(name, 0)) / n
        if d >= 0.5:
            deltas.append((d, short(name)))
    deltas.sort(reverse=True)
    where = "; ".join(f"{d:.0f} `{name}`" for d, name in deltas[:8])
    print(f"| {family} | {kind} | {per_op:.0f} | {where} |")


if __name__ == "__main__":
    main()
