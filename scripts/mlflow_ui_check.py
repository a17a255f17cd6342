"""Look at the MLflow UI the way a user does: a real `mlflow server`, real headless Chromium.

Checks what issue 13 asked of the tracking side, on the rendered pages (the DOM after the UI's
JavaScript ran), and saves a screenshot of each page:

1. experiment  the link masksam prints opens on the training runs table (not MLflow 3's GenAI
               overview), with the run's dataset, its source (`masksam train`) and its model version;
2. run         the training run shows its logged model, its registered version, "Created by",
               the source and the raw dataset as input;
3. model       the registered model has a description and lists its versions;
4. version     the version's model card (data, test metrics, lineage, intended use, limits)
               and its source run.

Needs Debian's Chromium (`apt-get install chromium`; /usr/bin/chromium). Give a tracking store
that holds a training run and a registered version, e.g. the demo's after `make repro`:

    python scripts/mlflow_ui_check.py --backend-store-uri sqlite:///mlflow.db --out ui-check

or `--url http://host:5000` for a server that already runs. Writes OUT/<page>.png, OUT/<page>.txt
(the page's visible text) and OUT/report.json; exits 1 naming every check that failed.
"""

from __future__ import annotations

import argparse
import html
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

# A single-page app: the page is done when its data has arrived, which virtual time cannot see.
# These flags keep Chromium off the (closed) network and out of the machine's GPU and D-Bus.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1600,1000", "--hide-scrollbars"]
VIEW = "workflowType=machine_learning"  # what masksam's printed links carry (components/_tracking.ui_url)


@dataclass
class Page:
    name: str
    route: str
    expect: list[str]  # visible text the page must show
    forbid: list[str] = field(default_factory=list)  # visible text it must not show


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if not found:
        raise SystemExit("no Chromium found: install Debian's (`apt-get install chromium`) and run again")
    return found


def visible_text(dom: str) -> str:
    """The page's text as a reader sees it: scripts, styles and tags dropped, spaces collapsed."""
    dom = re.sub(r"<(script|style)\b.*?</\1>", " ", dom, flags=re.S | re.I)
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", dom))).strip()


def render(url: str, png: Path, budget_ms: int, browser: str) -> str:
    """The rendered DOM of ``url`` and a screenshot of it, each from a fresh browser profile (so
    no view preference remembered from an earlier page changes what this link opens on)."""
    dom = ""
    for mode in ("--dump-dom", f"--screenshot={png}"):
        with tempfile.TemporaryDirectory(prefix="masksam-chromium-") as profile:
            proc = subprocess.run([browser, *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
                                   f"--virtual-time-budget={budget_ms}", mode, url],
                                  capture_output=True, text=True, timeout=180)
        if proc.returncode != 0:
            raise SystemExit(f"chromium failed on {url} (exit {proc.returncode}): {proc.stderr[-800:]}")
        if mode == "--dump-dom":
            dom = proc.stdout
    return dom


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(backend_store_uri: str, log: Path) -> tuple[subprocess.Popen, str]:
    """`mlflow server` over the store on a free loopback port; returns it and its URL once healthy."""
    port = free_port()
    mlflow = Path(sys.executable).with_name("mlflow")
    cmd = [str(mlflow) if mlflow.exists() else "mlflow", "server", "--backend-store-uri", backend_store_uri,
           "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    server = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"mlflow server exited with {server.returncode}; see {log}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return server, url
        except OSError:
            time.sleep(1)
    stop_server(server)
    raise SystemExit(f"mlflow server did not answer on {url} within 180 s; see {log}")


def stop_server(server: subprocess.Popen) -> None:
    try:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=20)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=20)


def pages_for(url: str, model_name: str, experiment: str) -> list[Page]:
    """The four pages, for the newest version of ``model_name`` and the run it was logged from."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=url)
    versions = client.search_model_versions(f"name = '{model_name}'")
    if not versions:
        raise SystemExit(f"no registered model {model_name!r} in this store: run the pipeline first")
    version = max(versions, key=lambda v: int(v.version))
    run = client.get_run(version.run_id)
    exp = client.get_experiment(run.info.experiment_id)
    if exp.name != experiment:
        print(f"note: version {version.version} was logged in experiment {exp.name!r}", file=sys.stderr)
    run_name = run.info.run_name
    model = f"{model_name} v{version.version}"
    return [
        Page("experiment", f"experiments/{exp.experiment_id}",
             [run_name, "Dataset", "Source", "masksam train", model], forbid=["Traces 0", "Token Usage"]),
        Page("run", f"experiments/{exp.experiment_id}/runs/{run.info.run_id}",
             ["Logged models (1)", "Registered models", model, "Created by", "Source masksam train",
              "Datasets", "data.dataset_sha256"]),
        Page("model", f"models/{model_name}",
             ["MaskSAM: prompt-free SAM", f"Version {version.version}"]),
        Page("version", f"models/{model_name}/versions/{version.version}",
             ["Source Run", run_name, "Intended use", "Limits", "Test metrics", "Lineage"],
             forbid=["content hash unknown"]),
    ]


def check(url: str, out: Path, model_name: str, experiment: str, budget_ms: int) -> dict:
    browser = chromium()
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for page in pages_for(url, model_name, experiment):
        link = f"{url}/#/{page.route}?{VIEW}"
        started = time.monotonic()
        text = visible_text(render(link, out / f"{page.name}.png", budget_ms, browser))
        (out / f"{page.name}.txt").write_text(text + "\n")
        missing = [t for t in page.expect if t not in text]
        shown = [t for t in page.forbid if t in text]
        results.append({"page": page.name, "url": link, "ok": not missing and not shown, "missing": missing,
                        "must_not_show": shown, "seconds": round(time.monotonic() - started, 1),
                        "screenshot": str(out / f"{page.name}.png")})
        status = "ok" if results[-1]["ok"] else f"FAILED (missing {missing}, shown {shown})"
        print(f"{page.name:10s} {status}  {link}", flush=True)
    report = {"url": url, "pages": results, "ok": all(r["ok"] for r in results)}
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n".join(__doc__.split("\n")[2:]))
    where = ap.add_mutually_exclusive_group(required=True)
    where.add_argument("--backend-store-uri", help="tracking store to serve (starts `mlflow server` on a "
                       "free 127.0.0.1 port for the check, stopped after)")
    where.add_argument("--url", help="an MLflow server that already runs, e.g. http://127.0.0.1:5000")
    ap.add_argument("--out", type=Path, default=Path("ui-check"), help="folder for screenshots, page "
                    "texts and report.json (default: ui-check)")
    ap.add_argument("--model-name", default="masksam", help="registered model to look at (its newest version)")
    ap.add_argument("--experiment", default="masksam", help="experiment the training runs are in")
    ap.add_argument("--budget-ms", type=int, default=20000, help="virtual time each page gets to load "
                    "its data before the DOM is read (default: 20000)")
    args = ap.parse_args(argv)
    server = None
    url = args.url
    if args.backend_store_uri:
        args.out.mkdir(parents=True, exist_ok=True)
        server, url = start_server(args.backend_store_uri, args.out / "server.log")
    try:
        report = check(url.rstrip("/"), args.out, args.model_name, args.experiment, args.budget_ms)
    finally:
        if server is not None:
            stop_server(server)
    print(("all pages show what they should" if report["ok"] else "some pages do not") + f"; see {args.out}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
