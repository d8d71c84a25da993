"""docker/check.sh's questions to the running compose stack, asked through the servers' own APIs from the host.

  stack_check.py wait --engine podman   every service's own health check passes and a worker serves the pool
  stack_check.py results                the deployment's MLflow runs and their S3 artifacts are there

Ports and image come from the environment check.sh exports (PREFECT_PORT, MLFLOW_PORT, NST_S3_PORT).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import urllib.request

PROJECT = "noisy-student"
HEALTHY = ("prefect-server", "mlflow", "s3")   # the services with a health check in compose.yaml
POOL = "compose-process"


def _url(port_var: str, path: str) -> str:
    return f"http://127.0.0.1:{os.environ[port_var]}{path}"


def _http(url: str, body: dict | None = None) -> object:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read() or b"null")


def _containers(engine: str) -> dict[str, str]:
    """service name -> container name, from the labels both docker compose and podman-compose set."""
    out = subprocess.run([engine, "ps", "-a", "--filter", f"label=com.docker.compose.project={PROJECT}",
                          "--format", '{{.Names}} {{index .Labels "com.docker.compose.service"}}'],
                         capture_output=True, text=True, check=True).stdout
    return {svc: name for name, svc in (line.split() for line in out.splitlines() if line.strip())}


def _healthy(engine: str, container: str) -> bool:
    """Runs the container's own HEALTHCHECK: podman without systemd schedules none, so ask it directly."""
    if engine == "podman":
        return subprocess.run([engine, "healthcheck", "run", container], capture_output=True).returncode == 0
    status = subprocess.run([engine, "inspect", "--format", "{{.State.Health.Status}}", container],
                            capture_output=True, text=True).stdout.strip()
    return status == "healthy"


def wait(engine: str, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    pending = set(HEALTHY) | {"worker"}
    while pending and time.monotonic() < deadline:
        ctrs = _containers(engine)
        for svc in sorted(pending & set(HEALTHY)):
            if svc in ctrs and _healthy(engine, ctrs[svc]):
                print(f"{svc}: healthy ({ctrs[svc]})")
                pending.discard(svc)
        if "worker" in pending and "prefect-server" not in pending:
            try:
                workers = _http(_url("PREFECT_PORT", f"/api/work_pools/{POOL}/workers/filter"), {})
            except OSError:
                workers = []
            online = [w["name"] for w in workers if w.get("status") == "ONLINE"]
            if online:
                print(f"worker: online in pool {POOL} ({online[0]})")
                pending.discard("worker")
        if pending:
            time.sleep(3)
    if pending:
        print(f"stack_check: not healthy within {timeout:.0f} s: {', '.join(sorted(pending))}", file=sys.stderr)
        return 1
    return 0


def results() -> int:
    import boto3
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=_url("MLFLOW_PORT", ""))
    exp = client.get_experiment_by_name("noisy-student")
    if exp is None:
        print("stack_check: no MLflow experiment 'noisy-student' on the stack's server", file=sys.stderr)
        return 1
    runs = client.search_runs([exp.experiment_id])
    finished = [r for r in runs if r.info.status == "FINISHED"]
    for r in sorted(finished, key=lambda r: r.info.start_time):
        top1 = r.data.metrics.get("test/top1")
        print(f"mlflow run {r.info.run_name}: FINISHED" + (f", test/top1 {top1:.3f}" if top1 is not None else ""))
    if len(finished) < 4:
        print(f"stack_check: {len(finished)} finished MLflow runs, expected the flow's parent run and g0-g2",
              file=sys.stderr)
        return 1
    # The keys compose.yaml gives the stack: the same variables with the same dummy defaults.
    s3 = boto3.client("s3", endpoint_url=_url("NST_S3_PORT", ""),
                      aws_access_key_id=os.environ.get("NST_S3_ACCESS_KEY_ID", "testing"),
                      aws_secret_access_key=os.environ.get("NST_S3_SECRET_ACCESS_KEY", "testing"),
                      region_name=os.environ.get("NST_S3_REGION", "us-east-1"))
    keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket="mlflow")
            for o in page.get("Contents", [])]
    print(f"s3://mlflow: {len(keys)} artifact objects, e.g. {', '.join(sorted(keys)[:3])}")
    if not keys:
        print("stack_check: no MLflow artifacts in s3://mlflow", file=sys.stderr)
        return 1
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("wait")
    w.add_argument("--engine", required=True)
    w.add_argument("--timeout", type=float, default=300)
    sub.add_parser("results")
    a = p.parse_args()
    return wait(a.engine, a.timeout) if a.cmd == "wait" else results()


if __name__ == "__main__":
    sys.exit(main())
