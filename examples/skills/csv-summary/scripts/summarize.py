"""Print a per-column summary of a CSV file (standard library only, so it runs in Ember's sandbox)."""

import argparse
import csv
import statistics
import sys
from collections import Counter


def number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def summarize(column: str, values: list[str]) -> str:
    present = [v for v in values if v.strip()]
    numbers = [n for n in map(number, present) if n is not None]
    if present and len(numbers) == len(present):
        low, high, mean = min(numbers), max(numbers), statistics.fmean(numbers)
        return f"{column}: numeric, count {len(numbers)}, min {low:.10g}, max {high:.10g}, mean {mean:.6g}"
    common = ", ".join(f"{value!r} x{count}" for value, count in Counter(present).most_common(3))
    return f"{column}: text, {len(set(present))} distinct; most common: {common or 'none'}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("path", help="the CSV file; its first row names the columns")
    parser.add_argument("--delimiter", default=",", help="the field separator (default ','; 'tab' for tabs)")
    args = parser.parse_args()
    delimiter = "\t" if args.delimiter == "tab" else args.delimiter
    try:
        with open(args.path, newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f, delimiter=delimiter))
    except OSError as e:
        print(f"cannot read {args.path}: {e.strerror}", file=sys.stderr)
        return 1
    if not rows:
        print(f"{args.path} is empty", file=sys.stderr)
        return 1
    header, body = rows[0], rows[1:]
    print(f"{len(body)} rows, {len(header)} columns")
    for i, column in enumerate(header):
        print(summarize(column, [row[i] if i < len(row) else "" for row in body]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
