"""``klstudy submit``: run a study on a Ray cluster through the Ray Jobs API.

The job's entrypoint is ``python -m study.cli run spec.yaml --study-dir DIR`` executed on the
cluster (the driver then joins the cluster through ``RAY_ADDRESS``, which Ray Jobs sets). The
spec travels in the job's ``working_dir``; klstudy itself must be installed on the cluster
(e.g. the image in docker/) unless ``ship_code`` uploads the packages as ``py_modules``.
"""

from __future__ import annotations

import shlex
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from workers._secrets import has_secret, redact_text, redact_url

_TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
_PACKAGES = ("study", "workers", "analysis")


@dataclass(frozen=True)
class Submission:
    job_id: str
    dashboard_url: str
    study_dir: str


def check_cluster_tracking(tracking_uri: str | None) -> None:
    """A study on a cluster logs from every node: refuse, up front, a store only one node has.

    Raises:
        ValueError: no tracking URI (the default is an sqlite file in the study directory),
            or an sqlite/file store.
    """
    local = "the default sqlite store in the study directory" if not tracking_uri else (
        repr(redact_url(tracking_uri)) if tracking_uri.startswith(("sqlite:", "file:"))
        or "://" not in tracking_uri else None)
    if local:
        raise ValueError(
            f"--tracking-uri: a study on a cluster needs an MLflow server every node can reach "
            f"(trials on other nodes cannot write {local}); pass --tracking-uri "
            "http://HOST:5000 or set $KLSTUDY_TRACKING_URI")


def _entrypoint(study_dir: str, tracking_uri: str | None, python: str) -> str:
    """The job's command line; a URI with credentials goes through the environment instead
    (a command line is shown by the dashboard and by ``ps`` on the head)."""
    args = [python, "-m", "study.cli", "-v", "run", "spec.yaml", "--study-dir", study_dir]
    if tracking_uri and not has_secret(tracking_uri):
        args += ["--tracking-uri", tracking_uri]
    return " ".join(shlex.quote(a) for a in args)


def submit_study(spec_path: Path, *, address: str, study_dir: str, tracking_uri: str | None = None,
                 ship_code: bool = False, python: str = "python",
                 env_vars: dict[str, str] | None = None) -> Submission:
    """Submit the study in ``spec_path`` to the cluster whose dashboard is at ``address``."""
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(address)
    with tempfile.TemporaryDirectory(prefix="klstudy-job-") as tmp:
        runtime_env: dict = {"working_dir": tmp, "env_vars": dict(env_vars or {})}
        text = Path(spec_path).read_text(encoding="utf-8")
        if redact_text(text) != text:  # pruning.storage with a password: through the env
            from study._spec import load_spec

            storage = load_spec(spec_path).pruning.storage
            runtime_env["env_vars"]["KLSTUDY_OPTUNA_STORAGE"] = storage
            text = redact_text(text)
        (Path(tmp) / "spec.yaml").write_text(text, encoding="utf-8")
        if tracking_uri and has_secret(tracking_uri):
            runtime_env["env_vars"]["KLSTUDY_TRACKING_URI"] = tracking_uri
        if ship_code:
            root = Path(__file__).resolve().parent.parent
            runtime_env["py_modules"] = [str(root / p) for p in _PACKAGES]
        job_id = client.submit_job(
            entrypoint=_entrypoint(study_dir, tracking_uri, python),
            runtime_env=runtime_env,
            metadata={"klstudy.study_dir": study_dir},
        )
    return Submission(job_id, address, study_dir)


def follow_job(submission: Submission, *, out: Callable[[str], None], poll_s: float = 2.0) -> str:
    """Print the job's logs as they grow until it ends; returns its final status."""
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(submission.dashboard_url)
    shown = 0
    while True:
        status = str(client.get_job_status(submission.job_id).value)
        logs = client.get_job_logs(submission.job_id)
        if len(logs) > shown:
            out(logs[shown:].rstrip("\n"))
            shown = len(logs)
        if status in _TERMINAL:
            return status
        time.sleep(poll_s)
