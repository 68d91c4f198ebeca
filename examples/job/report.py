"""The example job: read a CSV from /in, format it with tabulate, write /out/report.txt.

It runs inside the disposable VM: tabulate comes from the image's venv, the
CSV was copied in read-only, and only what lands in $VMISO_OUT comes back.
"""
import csv
import os
import sys

import tabulate

source = sys.argv[1] if len(sys.argv) > 1 else "scores.csv"
with open(source, newline="") as f:
    rows = list(csv.DictReader(f))
total = sum(int(row["score"]) for row in rows)
table = tabulate.tabulate(rows, headers="keys", tablefmt="github")
report = f"{table}\n\n{len(rows)} rows, total score {total}\n"
with open(os.path.join(os.environ["VMISO_OUT"], "report.txt"), "w") as out:
    out.write(report)
print(report, end="")
print(f"tabulate {tabulate.__version__}, wrote report.txt", file=sys.stderr)
