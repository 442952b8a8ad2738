"""Cold start of `import bioflow`, `bioflow --help` and `bioflow plugins`, and what they import.

Prints one JSON object: the median wall time of each command over --repeat fresh processes, and
whether torch or lightning were imported. Run: .venv/bin/python bench/cold_start.py
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    baseline = []
    for _ in range(args.repeat):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], check=True)
        baseline.append(time.perf_counter() - t)
    out = {"python_startup_s": round(statistics.median(baseline), 4), "commands": {}}
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


if __name__ == "__main__":
    main()
