"""Screenshots of a demo's MLflow store in a real browser, for docs/tracking.md.

    python scripts/mlflow_screenshots.py runs/demo/mlflow.db docs/images --prefix after

Starts ``mlflow ui`` on the store (a free local port), then Chromium headless takes three pictures: the runs table,
one run (the first hypernetwork run), and the compare view of all the runs; written as
``<out>/<prefix>_mlflow_{runs,run,compare}.png``. Needs Debian's ``chromium`` (``apt-get install chromium``). Rerun
whenever the logging changes.
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from urllib.parse import quote

SHOTS = ("runs", "run", "compare")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(url: str, seconds: float = 90) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise SystemExit(f"mlflow ui did not answer at {url} within {seconds:.0f} s")


def screenshot(chromium: str, url: str, out: Path, size: str = "1600,1000") -> None:
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run(
            [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--user-data-dir={profile}",
             f"--window-size={size}", "--virtual-time-budget=20000", f"--screenshot={out}", url],
            check=True, capture_output=True, timeout=180,
        )
    print(f"{out}  <-  {url}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("store", help="the demo's mlflow.db")
    parser.add_argument("out", help="directory for the PNG files")
    parser.add_argument("--prefix", default="after", help="file name prefix (default: %(default)s)")
    parser.add_argument("--experiment", default="demo")
    args = parser.parse_args(argv)
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("chromium not found (Debian: apt-get install chromium)")
    from mlflow import MlflowClient

    uri = f"sqlite:///{Path(args.store).resolve()}"
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(args.experiment)
    if experiment is None:
        raise SystemExit(f"{args.store}: no experiment {args.experiment!r}")
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])
    pick = next((r for r in runs if r.info.run_name in ("hart", "hypertuning", "pha")), runs[0])
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    artifacts = Path(args.store).resolve().parent / "mlartifacts"
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--default-artifact-root",
         artifacts.as_uri(), "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(base)
        exp = experiment.experiment_id
        ids = [r.info.run_id for r in runs]
        urls = {
            "runs": f"{base}/#/experiments/{exp}/runs?workflowType=machine_learning",
            "run": f"{base}/#/experiments/{exp}/runs/{pick.info.run_id}?workflowType=machine_learning",
            "compare": f"{base}/#/compare-runs?runs={quote(json.dumps(ids), safe='')}"
                       f"&experiments={quote(json.dumps([exp]), safe='')}",
        }
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        for name in SHOTS:
            screenshot(chromium, urls[name], out / f"{args.prefix}_mlflow_{name}.png")
    finally:
        server.terminate()
        server.wait(timeout=30)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
