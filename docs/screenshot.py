"""Screenshot of MLflow's compare view for a study's search trials (the README's image).

    python docs/screenshot.py --storage studies --study testbed [--out docs/mlflow-compare.png]

Starts `mlflow ui` on the study storage's SQLite store (127.0.0.1, a free port), builds the compare
URL of the study's search-trial runs, and takes the picture with headless Chromium (Debian package
`chromium`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ia2ray.tracking.server import free_port  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--storage", default="studies")
    parser.add_argument("--study", default="testbed")
    parser.add_argument("--out", default=str(ROOT / "docs" / "mlflow-compare.png"))
    parser.add_argument("--size", default="1600,1300")
    args = parser.parse_args()
    storage = Path(args.storage).resolve()
    uri = f"sqlite:///{storage / 'mlflow.db'}"
    sid = json.loads((storage / args.study / "study.json").read_text())["study_id"]

    from mlflow import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(args.study)
    runs = client.search_runs([exp.experiment_id], f"tags.`ia2ray.study_id` = '{sid}' and "
                              "tags.`ia2ray.phase` = 'search' and attributes.status = 'FINISHED'",
                              order_by=["metrics.`val/acc` DESC"])
    ids = [r.info.run_id for r in runs]
    port = free_port()
    ui = subprocess.Popen([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", "127.0.0.1",
                           "--port", str(port), "--workers", "1"], stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        for _ in range(240):
            try:
                urllib.request.urlopen(f"{base}/health", timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        query = urllib.parse.urlencode({"runs": json.dumps(ids), "experiments": json.dumps([exp.experiment_id])})
        url = f"{base}/#/compare-runs?{query}"
        with tempfile.TemporaryDirectory() as profile:
            subprocess.run([shutil.which("chromium") or "chromium", "--headless", "--no-sandbox", "--disable-gpu",
                            "--hide-scrollbars", f"--user-data-dir={profile}", f"--window-size={args.size}",
                            "--virtual-time-budget=30000", f"--screenshot={args.out}", url], check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=180)
    finally:
        os.killpg(ui.pid, signal.SIGTERM)
        ui.wait(timeout=30)
    print(f"{len(ids)} runs; {url}\nwrote {args.out}")


if __name__ == "__main__":
    main()
