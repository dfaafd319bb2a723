"""What startup.py's cuts save: the training script's libraries imported as they are and through
startup.import_libraries(), each in a fresh process, in turns, with the import time of the parts the cuts leave out.

Prints a table (median wall and CPU seconds over --runs processes of each, and from one `python -X importtime` run of
each, the cumulative import seconds of bitsandbytes' and scikit-learn's top-level modules, "-" where not imported)
and writes it as JSON.
Run from the example's folder: python3 -m benchmarks.startup_benchmark.
"""
import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch

VARIANTS = {
    "libraries imported as they are": "import transformers, colossalai.booster, colossalai.nn.optimizer, "
                                      "colossalai.nn.lr_scheduler",
    "startup.import_libraries()": "import startup; startup.import_libraries()",
}
# top-level modules whose import the cuts leave out or make cheaper
MODULES = ("bitsandbytes", "sklearn")


def timed(code):
    """Wall and CPU seconds of a fresh Python process running `code`."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def import_seconds(code):
    """Cumulative import seconds of each of MODULES in one `python -X importtime` run of `code` (None if not
    imported: not installed, or left out)."""
    run = subprocess.run([sys.executable, "-X", "importtime", "-c", code], check=True, capture_output=True, text=True)
    seconds = dict.fromkeys(MODULES)
    for line in run.stderr.splitlines():
        fields = line.removeprefix("import time:").split("|")
        if len(fields) == 3 and fields[2].strip() in MODULES:
            seconds[fields[2].strip()] = int(fields[1]) / 1e6
    return seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=6, help="processes of each variant, in turns, after a warm-up")
    parser.add_argument("--json", default="startup.json", help="where the table is also written")
    args = parser.parse_args()
    for code in VARIANTS.values():  # warm-up: the files in the page cache for both
        timed(code)
    runs = {name: [] for name in VARIANTS}
    for _ in range(args.runs):
        for name, code in VARIANTS.items():
            runs[name].append(timed(code))
    rows = {name: {"wall_seconds": statistics.median(wall for wall, _ in runs[name]),
                   "cpu_seconds": statistics.median(cpu for _, cpu in runs[name]),
                   "all_wall_seconds": [wall for wall, _ in runs[name]],
                   "import_seconds": import_seconds(code)} for name, code in VARIANTS.items()}
    print(f"{platform.node()}, {platform.processor() or platform.machine()}, Python {platform.python_version()}, "
          f"torch {torch.__version__}: median of {args.runs} processes each\n")
    print(f"| variant | wall s | CPU s | {' | '.join(f'{module} import s' for module in MODULES)} |")
    print("| --- | --- | --- |" + " --- |" * len(MODULES))
    for name, row in rows.items():
        print(f"| {name} | {row['wall_seconds']:.2f} | {row['cpu_seconds']:.2f} | "
              + " | ".join("-" if row["import_seconds"][module] is None else f"{row['import_seconds'][module]:.2f}"
                           for module in MODULES) + " |")
    with open(args.json, "w") as file:
        json.dump({"date": datetime.date.today().isoformat(), "python": platform.python_version(),
                   "torch": torch.__version__, "cpu_count": len(os.sched_getaffinity(0)),
                   "runs": args.runs, "variants": rows}, file, indent=2)


if __name__ == "__main__":
    main()
