"""``klstudy submit``: run a study on a Ray cluster through the Ray Jobs API.

The job's entrypoint is ``python -m study.cli run spec.yaml --study-dir DIR`` executed on the
cluster (the driver then joins the cluster through ``RAY_ADDRESS``, which Ray Jobs sets). The
spec travels in the job's ``working_dir``; klstudy itself must be installed on the cluster
(e.g. the image in docker/) unless ``ship_code`` uploads the packages as ``py_modules``.

A user's model or data module (kind ``python``) found in the spec's ``code_dir`` — a
``name.py`` file or a package directory — is copied into the job's ``working_dir`` next to
``spec.yaml``. Ray unpacks the working directory on every node and puts it first on
``PYTHONPATH`` of the job's driver and of every worker process (ray 2.60,
``_private/runtime_env/working_dir.py``: ``set_pythonpath_in_context``); Tune's trial actors
inherit the job's runtime environment, so the module imports everywhere without being
installed. (``py_modules`` would take a package directory, but the Jobs SDK of ray 2.60
uploads every local ``py_modules`` entry as a directory, so a single ``.py`` file fails
there.) A module that is not in ``code_dir`` (installed on the submitting machine) is not
shipped: it must be installed on the cluster too.
"""

from __future__ import annotations

import shlex
import shutil
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


def factory_modules(spec_path: Path) -> list[Path]:
    """The files (``name.py``) and packages (``name/__init__.py``) in the spec's ``code_dir``
    that hold its factories' top-level modules: what ``submit`` ships."""
    from study._spec import load_spec

    spec = load_spec(spec_path)
    if not spec.uses_factories() or spec.code_dir is None:
        return []
    found: list[Path] = []
    for ref in (spec.model.factory, spec.data.factory):
        if ref is None:
            continue
        top = ref.split(":", 1)[0].split(".", 1)[0]
        root = Path(spec.code_dir)
        for candidate in (root / top, root / f"{top}.py"):
            is_package = candidate.is_dir() and (candidate / "__init__.py").is_file()
            if (is_package or candidate.is_file()) and candidate not in found:
                found.append(candidate)
                break
    return found


def submit_study(spec_path: Path, *, address: str, study_dir: str, tracking_uri: str | None = None,
                 ship_code: bool = False, python: str = "python",
                 env_vars: dict[str, str] | None = None) -> Submission:
    """Submit the study in ``spec_path`` to the cluster whose dashboard is at ``address``;
    the spec's own model/data modules go with it (:func:`factory_modules`)."""
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
        for module in factory_modules(spec_path):  # the user's code travels with the spec
            if module.is_dir():
                shutil.copytree(module, Path(tmp) / module.name,
                                ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            else:
                shutil.copy2(module, Path(tmp) / module.name)
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
