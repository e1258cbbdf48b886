"""The short table printed last by scripts/gpu_check.sh: test counts, check counts, every bench row."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path


def main(out: Path) -> None:
    print(f"== summary ({(out / 'env.txt').read_text().splitlines()[1] if (out / 'env.txt').exists() else '?'})")
    log = (out / "gpu_tests.log").read_text() if (out / "gpu_tests.log").exists() else ""
    counts = re.findall(r"(\d+) (passed|failed|skipped|error)", log.splitlines()[-1] if log else "")
    print("pytest -m gpu:", ", ".join(f"{n} {k}" for n, k in counts) or "no result")
    if (out / "check.json").exists():
        rows = json.loads((out / "check.json").read_text())
        bad = [r for r in rows if max(r["errors"].values()) > r["tolerance"]]
        print(f"kernels check: {len(rows) - len(bad)} passed, {len(bad)} failed")
        for r in bad[:10]:
            print("  FAIL", r["kernel"], r["case"], r["dtype"], r["errors"])
    if (out / "bench.json").exists():
        rows = json.loads((out / "bench.json").read_text())
        print(f"{'kernel':<22}{'case':<26}{'dtype':<10}{'ms':>9}  metrics")
        for r in rows:
            metrics = "  ".join(f"{k} {v:.2f}" for k, v in r["metrics"].items())
            print(f"{r['kernel']:<22}{r['case']:<26}{r['dtype']:<10}{r['ms']:>9.4f}  {metrics}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
