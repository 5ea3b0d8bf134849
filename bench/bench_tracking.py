"""What MLflow tracking costs a study, and how fast the buffered run logger writes.

    python bench/bench_tracking.py [--out bench/results/tracking-cpu.json] [--trials 8] [--quick]

1. One search-only study of the default space (search_spaces/testbed.yaml, stages trained inside the
   trial process so the difference is not lost in Ray Train start-up), run three times in one go:
   tracking off (`--tracking-uri none`), the default SQLite store, and a real `mlflow server` on
   127.0.0.1. Reported: the search's wall time and the extra seconds per trial against tracking off.
2. `RunLog` alone, in this process, into each store: logging 5000 step metrics (as a trial's stage
   histories arrive: 100 calls of 50), closing the run, and finding it again by its tags.
`--quick` runs 2 trials of smoke.yaml and 500 metrics.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_study import run_study  # noqa: E402

from ia2ray.fileio import write_json_atomic  # noqa: E402
from ia2ray.tracking import RunLog, open_experiment  # noqa: E402
from ia2ray.tracking.server import start_local_server  # noqa: E402


def runlog_speed(uri: str, n_metrics: int) -> dict:
    exp = open_experiment(uri, "bench-runlog")
    key = {"ia2ray.study_id": f"bench-{time.time_ns()}", "ia2ray.trial_key": "t"}
    start = time.perf_counter()
    run = RunLog(uri, exp, key, run_name="bench")
    run.log_params({f"p{i}": str(i) for i in range(60)})  # about as many as a resolved run config
    per_call = 50
    for call in range(n_metrics // per_call):
        run.log_metrics([("align/loss", 1.0 / (s + 1), s) for s in range(call * per_call, (call + 1) * per_call)])
    logged = time.perf_counter()
    assert run.close() == []
    closed = time.perf_counter()
    again = RunLog(uri, exp, key)
    again.flush(force=True)
    found = time.perf_counter()
    assert again.run_id == run.run_id and again.resumed
    return {"metrics": n_metrics, "log_s": round(logged - start, 3), "close_s": round(closed - logged, 3),
            "find_again_s": round(found - closed, 3), "metrics_per_s": round(n_metrics / (closed - start))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="bench/results/tracking-cpu.json")
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    config = str(ROOT / "search_spaces/smoke.yaml") if args.quick else None
    trials = 2 if args.quick else args.trials
    sets = [f"study.num_trials={trials}", "train.num_workers=0", "study.confirm.top_k=0", "study.confirm.baselines=[]"]
    result: dict = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version()}, "studies": {}}
    with tempfile.TemporaryDirectory() as tmp:
        server = start_local_server(Path(tmp) / "server")
        try:
            for label, uri in (("off", "none"), ("sqlite", None), ("server", server.url)):
                extra = ["--tracking-uri", uri] if uri else []
                r = run_study(config, Path(tmp) / label, sets, extra)
                result["studies"][label] = {k: r[k] for k in ("command", "process_wall_s", "phases_s", "trials",
                                                              "mean_run_wall_s")}
                print(label, json.dumps(result["studies"][label]), flush=True)
            off = result["studies"]["off"]["phases_s"]["search"]
            for label in ("sqlite", "server"):
                s = result["studies"][label]
                s["extra_search_s_per_trial"] = round((s["phases_s"]["search"] - off) / s["trials"], 2)
            n = 500 if args.quick else 5000
            result["runlog"] = {"sqlite": runlog_speed(f"sqlite:///{Path(tmp) / 'runlog.db'}", n),
                                "server": runlog_speed(server.url, n)}
            print(json.dumps(result["runlog"]), flush=True)
        finally:
            server.stop()
    write_json_atomic(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
