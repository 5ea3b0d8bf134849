"""Screenshot of MLflow's compare view for a study's search trials (the image in docs/tracking.md).

    python docs/screenshot.py --storage studies --study testbed [--out docs/mlflow-compare.png]

Starts an `mlflow server` on the study storage's SQLite store (127.0.0.1, a free port), builds the compare
URL of the study's search-trial runs, and takes the picture with headless Chromium (Debian package
`chromium`).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import urllib.parse
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ia2ray.study.records import study_runs  # noqa: E402
from ia2ray.tracking.server import start_local_server  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--storage", default="studies")
    parser.add_argument("--study", default="testbed")
    parser.add_argument("--out", default=str(ROOT / "docs" / "mlflow-compare.png"))
    parser.add_argument("--size", default="1600,1300")
    args = parser.parse_args()
    storage = Path(args.storage).resolve()
    uri = f"sqlite:///{storage / 'mlflow.db'}"
    runs = study_runs(uri, storage / args.study, "tags.`ia2ray.phase` = 'search' and attributes.status = 'FINISHED'",
                      order_by=["metrics.`val/acc` DESC"])
    ids, experiment = [r.info.run_id for r in runs], runs[0].info.experiment_id
    with tempfile.TemporaryDirectory() as tmp:
        server = start_local_server(Path(tmp), backend_uri=uri)
        try:
            query = urllib.parse.urlencode({"runs": json.dumps(ids), "experiments": json.dumps([experiment])})
            url = f"{server.url}/#/compare-runs?{query}"
            subprocess.run([shutil.which("chromium") or "chromium", "--headless", "--no-sandbox", "--disable-gpu",
                            "--hide-scrollbars", f"--user-data-dir={tmp}/profile", f"--window-size={args.size}",
                            "--virtual-time-budget=30000", f"--screenshot={args.out}", url], check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=180)
        finally:
            server.stop()
    print(f"{len(ids)} runs; {url}\nwrote {args.out}")


if __name__ == "__main__":
    main()
