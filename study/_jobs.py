"""``klstudy submit``: run a study on a Ray cluster through the Ray Jobs API.

The job's entrypoint is ``python -m study.cli run spec.yaml --study-dir DIR`` executed on the
cluster (the driver then joins the cluster through ``RAY_ADDRESS``, which Ray Jobs sets). The
spec travels in the job's ``working_dir``; klstudy itself must be installed on the cluster
(e.g. the image in docker/) unless ``ship_code`` uploads the packages as ``py_modules``.
"""

from __future__ import annotations

import shlex
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

_TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
_PACKAGES = ("study", "workers", "analysis")


@dataclass(frozen=True)
class Submission:
    job_id: str
    dashboard_url: str
    study_dir: str


def _entrypoint(study_dir: str, tracking_uri: str | None, python: str) -> str:
    args = [python, "-m", "study.cli", "-v", "run", "spec.yaml", "--study-dir", study_dir]
    if tracking_uri:
        args += ["--tracking-uri", tracking_uri]
    return " ".join(shlex.quote(a) for a in args)


def submit_study(spec_path: Path, *, address: str, study_dir: str, tracking_uri: str | None = None,
                 ship_code: bool = False, python: str = "python",
                 env_vars: dict[str, str] | None = None) -> Submission:
    """Submit the study in ``spec_path`` to the cluster whose dashboard is at ``address``."""
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(address)
    with tempfile.TemporaryDirectory(prefix="klstudy-job-") as tmp:
        shutil.copyfile(spec_path, Path(tmp) / "spec.yaml")
        runtime_env: dict = {"working_dir": tmp, "env_vars": dict(env_vars or {})}
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
