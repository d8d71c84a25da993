"""Read a test Prefect server through Prefect's own client (`prefect.client.orchestration.get_client`)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


@contextlib.contextmanager
def client_for(api_url: str) -> Iterator:
    """A sync Prefect client of the server at `api_url` (settings scoped to the block, not the test process)."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api_url}):
        with get_client(sync_client=True) as client:
            yield client


def flow_runs_of(client, flow_name: str) -> list:
    """All runs of the flow `flow_name`, newest first."""
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName
    from prefect.client.schemas.sorting import FlowRunSort

    return client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=[flow_name])),
                                 sort=FlowRunSort.EXPECTED_START_TIME_DESC, limit=200)


def run_for_params(client, params_path: str, flow_name: str = "noisy-student"):
    """The newest run of `flow_name` whose `params_path` parameter is `params_path`."""
    runs = [r for r in flow_runs_of(client, flow_name) if r.parameters.get("params_path") == params_path]
    assert runs, f"no {flow_name} run with params_path={params_path}"
    return runs[0]


def subflow_runs(client, flow_run_id) -> list:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    return client.read_flow_runs(
        flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[flow_run_id])))


def task_runs(client, flow_run_ids) -> list:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    return client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=list(flow_run_ids))),
                                 limit=200)


def artifacts(client, flow_run_ids) -> list:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    return client.read_artifacts(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=list(flow_run_ids))))


def logs(client, flow_run_ids) -> list:
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    out = []
    for run_id in flow_run_ids:
        out += client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])), limit=200)
    return out
