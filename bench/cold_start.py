"""Cold start of `import bioflow`, `bioflow --help` and `bioflow plugins`, and what they import.

Prints one JSON object: the median wall time of each command over --repeat fresh processes, and
whether torch or lightning were imported.

Run:   .venv/bin/python bench/cold_start.py [--repeat 7]
Smoke: .venv/bin/python bench/cold_start.py --smoke     (one process per command, seconds; run by the tests)

``--smoke`` starts each command once (``--repeat 1``): the times are single samples, the JSON has
the same structure plus ``"smoke": true``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

PROBES = {
    "import bioflow": "import bioflow",
    "bioflow --help": "import sys; sys.argv=['bioflow','--help']\nfrom bioflow.cli import main\ntry: main()\nexcept SystemExit: pass",
    "bioflow plugins": "from bioflow.cli import main; main(['plugins'])",
}
CHECK = "\nimport sys; print('\\n@@', 'torch' in sys.modules, 'lightning' in sys.modules)"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--smoke", action="store_true", help="one process per command: checks that the bench runs")
    args = parser.parse_args(argv)
    if args.smoke:
        args.repeat = 1
    baseline = []
    for _ in range(args.repeat):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], check=True)
        baseline.append(time.perf_counter() - t)
    out: dict = {"python_startup_s": round(statistics.median(baseline), 4), "commands": {}}
    if args.smoke:
        out["smoke"] = True
    for name, code in PROBES.items():
        times = []
        for _ in range(args.repeat):
            t = time.perf_counter()
            result = subprocess.run([sys.executable, "-c", code + CHECK], capture_output=True, text=True, check=True)
            times.append(time.perf_counter() - t)
        flags = result.stdout.rsplit("@@", 1)[1].split()
        out["commands"][name] = {
            "median_s": round(statistics.median(times), 4),
            "imports_torch": flags[0] == "True",
            "imports_lightning": flags[1] == "True",
        }
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
