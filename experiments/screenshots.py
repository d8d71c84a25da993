"""The README's two screenshots, taken with headless Chromium against the real servers:

1. the Prefect UI's flow-run graph of a pipeline run (model subflows, mapped label shard groups), from a Prefect
   server started here and a short toy run against it;
2. MLflow's view of a study's comparison chart (the study run's artifact), from `mlflow server` on the study's
   tracking store;
3. the first look after `make run`: the pipeline run's charts (accuracy, ECE, kept fraction by generation), from
   `mlflow server` on the `outputs/mlflow.db` it leaves (`--only generations`).

    .venv/bin/python experiments/screenshots.py --study experiments/digits-3-noise.yaml   # after `nst study` ran

Needs Debian's `chromium` (apt-get install chromium). Every server started here is stopped by PID at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
from servers import ServerProcess, free_port  # noqa: E402  (the tests' server harness: started and stopped by PID)

BIN = Path(sys.executable).parent
CHROME_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--hide-scrollbars", "--force-device-scale-factor=1"]


def shoot(url: str, out: Path, size: str = "1600,1000", budget_ms: int = 30000) -> None:
    chrome = shutil.which("chromium") or shutil.which("chromium-browser")
    if chrome is None:
        raise SystemExit("chromium not found (apt-get install chromium)")
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run([chrome, *CHROME_FLAGS, f"--user-data-dir={profile}", f"--window-size={size}",
                        f"--virtual-time-budget={budget_ms}", f"--screenshot={out}", url], check=True,
                       capture_output=True, timeout=300)
    print(f"{out}: {url}")


def prefect_shot(work: Path, out: Path) -> None:
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(work / "prefect-home"), "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1", "PREFECT_UI_API_URL":
           f"http://127.0.0.1:{port}/api"}
    server = ServerProcess([BIN / "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)], port=port,
                           log_path=work / "prefect.log", ready_path="/api/health", env=env, cwd=ROOT,
                           ready_timeout=180)
    try:
        proj = work / "toy"
        proj.mkdir()
        shutil.copy(ROOT / "params.yaml", proj / "params.yaml")
        over = ["-S", "teacher.epochs=20", "-S", "generations.0.student.epochs=4", "-S",
                "generations.1.student.epochs=4", "-S", "tracking.enabled=false", "-S", "pseudo_label.shard_size=300"]
        subprocess.run([sys.executable, "-m", "cli", "run", "-p", str(proj / "params.yaml"), *over], env=env,
                       check=True, cwd=work, capture_output=True, timeout=1200)
        from prefect.client.orchestration import get_client
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings({PREFECT_API_URL: env["PREFECT_API_URL"]}):
            with get_client(sync_client=True) as client:
                runs = client.read_flow_runs()
                flow_run = next(r for r in runs if r.parent_task_run_id is None
                                and r.parameters.get("params_path", "").endswith("toy/params.yaml"))
                g1 = next(r for r in runs if r.name == "g1/generation")
        shoot(f"http://127.0.0.1:{port}/runs/flow-run/{flow_run.id}", out, size="1600,900", budget_ms=45000)
        shoot(f"http://127.0.0.1:{port}/runs/flow-run/{g1.id}", out.with_name(out.stem + "-g1.png"), size="1600,900",
              budget_ms=45000)
    finally:
        server.stop(20)


def _mlflow_server(uri: str, log_path: Path) -> tuple[int, ServerProcess]:
    """`mlflow server` on a tracking store, on a free port; the caller stops it (by PID) when done."""
    port = free_port()
    return port, ServerProcess([BIN / "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                                "--backend-store-uri", uri, "--workers", "1"], port=port, log_path=log_path,
                               ready_path="/health", env={"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}, cwd=ROOT,
                               ready_timeout=180)


def mlflow_shot(study_file: Path, out: Path, work: Path) -> None:
    from mlflow import MlflowClient

    from nst.config import load_config
    from nst.study import common_overrides, load_study
    from nst.tracking import tracking_uri

    st = load_study(study_file)
    cfg = load_config(st.params, common_overrides(st))
    uri = tracking_uri(cfg)
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    run = client.search_runs([exp.experiment_id], f"tags.kind = 'study' and tags.study = '{st.name}'",
                             order_by=["attributes.start_time DESC"], max_results=1)[0]
    client.set_experiment_tag(exp.experiment_id, "mlflow.experimentKind", "custom_model_development")
    port, server = _mlflow_server(uri, work / "mlflow.log")
    try:
        url = (f"http://127.0.0.1:{port}/#/experiments/{exp.experiment_id}/runs/{run.info.run_id}/artifacts/"
               f"report/{st.name}.png?workflowType=machine_learning")  # the UI's model-training layout
        shoot(url, out, size="1600,1000", budget_ms=30000)
        from PIL import Image

        with Image.open(out) as im:  # without MLflow's assistant side panel (it opens by default)
            im.crop((0, 0, 1190, 760)).save(out)
    finally:
        server.stop(20)


def generations_shot(out_dir: Path, out: Path, work: Path) -> None:
    """The first look after `make run`: the pipeline run's metrics page, accuracy, ECE and kept fraction by generation."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{(out_dir / 'mlflow.db').resolve()}"
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("noisy-student")
    if exp is None:
        raise SystemExit(f"{out_dir / 'mlflow.db'}: no experiment 'noisy-student' (run `make run` first)")
    run = client.search_runs([exp.experiment_id], "tags.kind = 'pipeline'", order_by=["attributes.start_time DESC"],
                             max_results=1)[0]
    port, server = _mlflow_server(uri, work / "mlflow-gen.log")
    try:
        # The run's page as it opens, in the UI's "Model training" mode (MLflow 3.17 starts a new browser in GenAI
        # mode whatever the experiment's kind; the README gives this URL).
        page = f"#/experiments/{exp.experiment_id}/runs/{run.info.run_id}/model-metrics?workflowType=machine_learning"
        shoot(f"http://127.0.0.1:{port}/{page}", out, size="1600,1000", budget_ms=90000)
    finally:
        server.stop(20)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--study", default="experiments/digits-3-noise.yaml")
    ap.add_argument("--out", default="docs")
    ap.add_argument("--only", choices=["prefect", "mlflow", "generations"], default=None)
    ap.add_argument("--out-dir", default="outputs", help="the out_dir `make run` left (for the generations shot)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="nst-shots-"))
    try:
        if args.only in (None, "prefect"):
            prefect_shot(work, ROOT / args.out / "prefect-flow-run.png")
        if args.only in (None, "mlflow"):
            mlflow_shot(ROOT / args.study, ROOT / args.out / "mlflow-study.png", work)
        if args.only in (None, "generations"):
            generations_shot(Path(args.out_dir), ROOT / args.out / "mlflow-generations.png", work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({"ok": True}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
