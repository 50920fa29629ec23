"""Session-wide fixtures for integration tests: a real 2-node Ray cluster, an MLflow server and
a PostgreSQL server.

Each service starts once per test session, and only if some selected test requests it.
Tests that request `ray_cluster`, `mlflow_server` or `postgres` are marked `integration`
automatically.
Skip them locally with `KLSTUDY_SKIP_INTEGRATION=1` or `--skip-integration` (CI runs them).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from _postgres import PostgresServer  # tests/ is on sys.path (rootdir conftest)
from _services import LOCAL_RAY, MlflowServer, RayCluster

SERVICE_FIXTURES = ("ray_cluster", "mlflow_server", "postgres")

# One Ray auth mode for every Ray this session starts or joins, set before any starts
# (FIELD-NOTES: set it explicitly and identically for every process). Left unset, Ray 2.60's
# first local ray.init() turns token auth on for this process (and writes ~/.ray/auth_token);
# the embedded Ray restarted later under the ray_cluster fixture's "disabled" then had every
# actor cancelled before it started (test_services_smoke's restart test).
os.environ["RAY_AUTH_MODE"] = "disabled"
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--skip-integration", action="store_true", default=False,
        help="skip tests marked integration (same as KLSTUDY_SKIP_INTEGRATION=1)",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip = (config.getoption("--skip-integration")
            or os.environ.get("KLSTUDY_SKIP_INTEGRATION", "") == "1")
    for item in items:
        if any(name in getattr(item, "fixturenames", ()) for name in SERVICE_FIXTURES):
            item.add_marker(pytest.mark.integration)
        if skip and item.get_closest_marker("integration") is not None:
            item.add_marker(pytest.mark.skip(reason="integration tests skipped "
                                             "(KLSTUDY_SKIP_INTEGRATION=1 or --skip-integration)"))
    items[:] = _heavy_modules_first(items)


def _heavy_modules_first(items: list[pytest.Item]) -> list[pytest.Item]:
    """The modules with slow tests first, then those with integration tests, then the rest,
    each module's tests together and in their order. With parallel test processes (CI:
    ``-n 2 --dist loadfile``, each file one unit of work handed out in this order) the long
    files start first and the short ones fill the gaps, instead of one long file starting
    last while the other process idles."""
    def weight(item: pytest.Item) -> int:
        return 2 if item.get_closest_marker("slow") else (
            1 if item.get_closest_marker("integration") else 0)

    modules: dict[str, list[pytest.Item]] = {}
    for item in items:
        modules.setdefault(item.nodeid.split("::", 1)[0], []).append(item)
    order = sorted(modules.values(), key=lambda group: -max(map(weight, group)))
    return [item for group in order for item in group]


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayCluster]:
    """A head node and a worker node on loopback, 1 CPU each.

    This process has RAY_AUTH_MODE=disabled for the whole session (set above, as the nodes
    have it), so `ray.init(address=ray_cluster.gcs_address)` connects. Connect in a fixture of
    your own and call `ray.shutdown()` when done; never `ray stop`.
    """
    with RayCluster(tmp_path_factory.mktemp("ray")) as cluster:
        yield cluster


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """An MLflow tracking server (sqlite backend, artifacts served) at `mlflow_server.uri`."""
    with MlflowServer(tmp_path_factory.mktemp("mlflow")) as server:
        yield server


@pytest.fixture(scope="session")
def postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresServer]:
    """PostgreSQL on 127.0.0.1 (throwaway data dir) with database `mlflow`, like the compose
    stack's postgres service before its init script; `postgres.url(db)` for SQLAlchemy."""
    with PostgresServer(tmp_path_factory.mktemp("postgres"), databases=("mlflow",)) as server:
        yield server


@pytest.fixture(scope="session")
def ray_local() -> Iterator[None]:
    """Embedded Ray in this test process (2 CPUs), started once for every test that drives a
    study in-process (``run_study``/``resume_study`` use the Ray they find). A test that needs
    this process connected elsewhere shuts it down first and calls ``restart_local_ray()``
    after (``tests/test_services_smoke.py``)."""
    import ray

    if not ray.is_initialized():
        ray.init(**LOCAL_RAY)
    yield
    ray.shutdown()
