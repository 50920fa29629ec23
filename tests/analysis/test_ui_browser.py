"""`klstudy ui`: the MLflow UI command for a study's store, and a headless-Chromium check that the
UI shows the study's parent run with its nested trial runs, and that report.html renders offline.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from _services import free_port

from analysis._load import ReportError
from analysis._report import build_report
from analysis._synthetic import write_synthetic_study
from analysis._ui import (
    experiment_url,
    serve_ui,
    stop_ui,
    ui_command,
    ui_url,
    wait_for_health,
)

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]
HEALTH_TIMEOUT_S = 90.0  # ~6 s on an idle 2-core machine (FIELD-NOTES), much more under load
UI_TIMEOUT_MS = 60_000
N_TRIALS = 4


def write_meta(study: Path, **meta: object) -> Path:
    study.mkdir(parents=True, exist_ok=True)
    (study / "study.json").write_text(json.dumps({"name": study.name, **meta}))
    return study


def test_ui_command_serves_the_embedded_sqlite_store_with_its_artifacts(tmp_path):
    study = write_meta(tmp_path / "s", tracking_uri=f"sqlite:///{tmp_path / 's' / 'mlflow.db'}")
    (study / "mlflow.db").touch()
    cmd = ui_command(study, port=5123)
    assert cmd[:4] == [sys.executable, "-m", "mlflow", "server"]
    options = dict(zip(cmd[4::2], cmd[5::2], strict=True))
    assert options == {"--backend-store-uri": f"sqlite:///{study / 'mlflow.db'}",
                       "--default-artifact-root": str(study / "mlartifacts"),
                       "--host": "127.0.0.1", "--port": "5123", "--workers": "1"}


def test_ui_command_defaults_to_the_store_inside_the_study_directory(tmp_path):
    study = write_meta(tmp_path / "s", tracking_uri=None)
    (study / "mlflow.db").touch()
    assert f"sqlite:///{study.resolve() / 'mlflow.db'}" in ui_command(study)


@pytest.mark.parametrize("uri", ["http://10.0.0.5:5000", "https://mlflow.example.org"])
def test_ui_command_points_to_a_remote_tracking_server_instead(tmp_path, uri):
    study = write_meta(tmp_path / "s", tracking_uri=uri, experiment_id="7")
    with pytest.raises(ReportError, match=rf"open {uri}/#/experiments/7/runs"):
        ui_command(study)


@pytest.mark.parametrize(("setup", "message"), [
    ("no_study", r"study\.json: not found"),
    ("no_store", r"no such MLflow store"),
    ("bad_port", r"port: must be in \[1, 65535\], got 70000"),
])
def test_ui_command_reports_what_is_wrong(tmp_path, setup, message):
    study = tmp_path / "s"
    if setup != "no_study":
        write_meta(study, tracking_uri=f"sqlite:///{study / 'mlflow.db'}")
    if setup == "bad_port":
        (study / "mlflow.db").touch()
    with pytest.raises(ReportError, match=message):
        ui_command(study, port=70000 if setup == "bad_port" else 5000)


@pytest.mark.parametrize("base", ["http://127.0.0.1:5000", "http://127.0.0.1:5000/"])
def test_experiment_url_opens_the_runs_table(base):
    assert experiment_url(base, "3") == "http://127.0.0.1:5000/#/experiments/3/runs"


def test_ui_url_opens_the_study_experiment(tmp_path):
    study = write_meta(tmp_path / "s", experiment_id="12")
    assert ui_url(study, port=5001) == "http://127.0.0.1:5001/#/experiments/12/runs"


def test_serve_ui_starts_a_lean_server_in_its_own_process_group(tmp_path, monkeypatch):
    study = write_meta(tmp_path / "s", tracking_uri=f"sqlite:///{tmp_path / 's' / 'mlflow.db'}")
    (study / "mlflow.db").touch()
    started = {}
    monkeypatch.setattr(subprocess, "Popen", lambda cmd, **kw: started.update(cmd=cmd, **kw))
    serve_ui(study, port=5002)
    assert started["env"]["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
    assert started["cmd"][-2:] == ["--workers", "1"]
    assert started["start_new_session"] is True


def test_wait_for_health_gives_up_when_the_server_exits():
    proc = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    assert not wait_for_health(f"http://127.0.0.1:{free_port()}", timeout_s=60, proc=proc)
    assert proc.returncode == 3


@pytest.fixture
def ui_study(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A finished synthetic study logged to its own sqlite store: parent run + nested trials."""
    monkeypatch.chdir(tmp_path)  # the synthetic experiment's default artifact root is ./mlruns
    study = tmp_path / "ui-study"
    study.mkdir()
    write_synthetic_study(study, n_trials=N_TRIALS, n_evals=8, p_pruned=0.0, p_error=0.0,
                          tracking_uri=f"sqlite:///{study / 'mlflow.db'}")
    return study


@pytest.mark.integration
@pytest.mark.timeout(600)
@pytest.mark.skipif(not CHROMIUM.exists(),
                    reason="needs /usr/bin/chromium (CI installs it: apt-get install chromium)")
def test_ui_shows_nested_trial_runs_and_report_renders_offline(ui_study, tmp_path):
    sync_playwright = pytest.importorskip("playwright.sync_api").sync_playwright
    meta = json.loads((ui_study / "study.json").read_text())
    trial_ids = list(pd.read_parquet(ui_study / "trials.parquet")["trial_id"])
    report = build_report(ui_study)
    port = free_port()
    proc = serve_ui(ui_study, port=port)
    try:
        base = f"http://127.0.0.1:{port}"
        log_file = ui_study / "mlflow-ui.log"
        assert wait_for_health(base, timeout_s=HEALTH_TIMEOUT_S, proc=proc), log_file.read_text()
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=str(CHROMIUM),
                                                 args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 900})
                page.goto(ui_url(ui_study, port=port))
                cells = page.locator('[role="gridcell"]')  # the runs table, not the breadcrumb
                parent = cells.filter(has=page.get_by_role("link", name=meta["name"], exact=True))
                parent.wait_for(timeout=UI_TIMEOUT_MS)
                parent.locator("button").first.click()  # the expander of its nested runs
                for trial_id in trial_ids:
                    cells.get_by_role("link", name=trial_id, exact=True).wait_for(
                        timeout=UI_TIMEOUT_MS)
                page.screenshot(path=str(tmp_path / "mlflow-ui.png"))

                page.goto(report.html_path.as_uri())
                widths = page.evaluate("Array.from(document.images).map(i => i.naturalWidth)")
                summary = page.locator("section#summary li").all_inner_texts()
                page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
            finally:
                browser.close()
    finally:
        stop_ui(proc)
    assert len(widths) == len(report.figure_paths) and all(w > 0 for w in widths)
    assert any("validation ELBO (max)" in line for line in summary)
