"""build_report: a self-contained HTML file plus PNGs, a partial banner, overwrite on re-run."""

from __future__ import annotations

import base64
import json
import logging
import re
import shutil
from pathlib import Path

import pytest
from _services import free_port

from analysis._load import ReportError
from analysis._report import REPORT_FILE, build_report
from analysis._synthetic import write_synthetic_study

GRID = {"n_cycles": (1, 2, 4), "ratio": (0.0, 0.5, 1.0), "ramp": ("linear", "cosine"),
        "beta_max": (1.0,)}  # 18 configurations
N_TRIALS = 36  # 2 seeds each
SMALL_GRID = {"n_cycles": (1, 4), "ratio": (0.0, 0.5, 1.0), "ramp": ("linear",),
              "beta_max": (1.0,)}  # 6 configurations


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    study = tmp_path_factory.mktemp("study") / "toy-grid"
    write_synthetic_study(study, n_trials=N_TRIALS, n_evals=16, seed=3, grid=GRID, p_pruned=0.3)
    return study, build_report(study, log_to_mlflow=False)


def html_of(result) -> str:
    return result.html_path.read_text()


def test_report_is_written_next_to_its_pngs(finished):
    study, result = finished
    assert result.html_path == study / "report" / REPORT_FILE
    assert result.figure_paths and all(p.parent == result.html_path.parent for p in
                                       result.figure_paths)
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in result.figure_paths)


def test_report_references_no_external_resource(finished):
    text = html_of(finished[1])
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", text, re.I)
    assert not re.search(r"<(script|link|iframe)\b|@import|url\(", text, re.I)


def test_report_embeds_every_figure_as_its_png(finished):
    _, result = finished
    sources = re.findall(r"<img [^>]*src=\"([^\"]+)\"", html_of(result))
    assert len(sources) == len(result.figure_paths)
    assert all(s.startswith("data:image/png;base64,") for s in sources)
    embedded = {base64.b64decode(s.split(",", 1)[1]) for s in sources}
    assert embedded == {p.read_bytes() for p in result.figure_paths}


def test_report_has_every_kind_of_figure(finished):
    names = {p.name for p in finished[1].figure_paths}
    heatmaps = {f"heatmap-{k}-{m}.png" for k in ("final", "best")
                for m in ("elbo", "kl", "rec", "mi", "au")}
    others = {"rate-distortion.png", "curves.png", "latents.png", "pruning.png",
              "heatmap-final-uses_z.png"}
    assert heatmaps | others == names


def test_report_sections_appear_in_order(finished):
    text = html_of(finished[1])
    ids = ["summary", "rate-distortion", "heatmaps", "tests", "curves", "latents", "configs",
           "paired", "pooled", "pruning"]
    positions = [text.find(f"<section id='{i}'>") for i in ids]
    assert -1 not in positions and positions == sorted(positions)


def test_report_of_a_finished_study_has_no_partial_banner(finished):
    assert not finished[1].partial
    assert "PARTIAL REPORT" not in html_of(finished[1])


def test_report_draws_no_figure_that_failed(finished):
    assert "could not be drawn" not in html_of(finished[1])


def test_partial_study_gets_a_banner_with_progress(tmp_path):
    study = tmp_path / "running"
    write_synthetic_study(study, n_trials=12, n_evals=8, n_running=5, p_pruned=0.0, p_error=0.0)
    result = build_report(study, log_to_mlflow=False)
    assert result.partial
    assert "PARTIAL REPORT — study still running (7 of 12 trials finished)" in html_of(result)


def test_rerun_overwrites_the_report_and_removes_stale_figures(tmp_path):
    study = tmp_path / "s"
    write_synthetic_study(study, n_trials=8, n_evals=8, seed=1)
    first = build_report(study, log_to_mlflow=False)
    first.html_path.write_text("stale")
    stale = first.html_path.parent / "heatmap-final-old.png"
    stale.write_bytes(b"old")
    second = build_report(study, log_to_mlflow=False)
    assert second.html_path == first.html_path
    assert html_of(second).startswith("<!DOCTYPE html>")
    assert not stale.exists()
    assert sorted(second.figure_paths) == sorted(first.figure_paths)


def test_out_dir_is_honoured(tmp_path):
    study = tmp_path / "s"
    write_synthetic_study(study, n_trials=4, n_evals=4)
    result = build_report(study, out_dir=tmp_path / "elsewhere", log_to_mlflow=False)
    assert result.html_path == tmp_path / "elsewhere" / REPORT_FILE
    assert not (study / "report").exists()


def test_strings_from_the_data_are_escaped(tmp_path):
    study = tmp_path / "s"
    write_synthetic_study(study, n_trials=4, n_evals=4, name="<img src=x onerror=alert(1)>&")
    text = html_of(build_report(study, log_to_mlflow=False))
    assert "<img src=x" not in text
    assert "&lt;img src=x onerror=alert(1)&gt;&amp;" in text


def test_report_is_logged_to_the_parent_run(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)  # the synthetic experiment's default artifact root is ./mlruns
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    study = tmp_path / "s"
    write_synthetic_study(study, n_trials=4, n_evals=4, tracking_uri=uri)
    result = build_report(study)
    parent = json.loads((study / "study.json").read_text())["parent_run_id"]
    logged = {Path(a.path).name for a in MlflowClient(uri).list_artifacts(parent, "report")}
    assert logged == {REPORT_FILE, "summary.json", *(p.name for p in result.figure_paths)}


@pytest.mark.parametrize("problem", ["no_parent_run", "unreachable_server", "missing_sqlite"])
def test_report_survives_a_missing_tracking_store(tmp_path, caplog, problem):
    study = tmp_path / "s"
    write_synthetic_study(study, n_trials=4, n_evals=4)
    meta = json.loads((study / "study.json").read_text())
    if problem != "no_parent_run":
        meta["parent_run_id"] = "0123456789abcdef"
        absent_db, dead_server = tmp_path / "absent.db", f"http://127.0.0.1:{free_port()}"
        meta["tracking_uri"] = (f"sqlite:///{absent_db}" if problem == "missing_sqlite"
                                else dead_server)
    (study / "study.json").write_text(json.dumps(meta))
    with caplog.at_level(logging.WARNING, logger="analysis._report"):
        result = build_report(study)
    assert result.html_path.is_file()
    assert any("not logged to MLflow" in r.getMessage() for r in caplog.records)
    assert not (tmp_path / "absent.db").exists()


def test_report_from_mlflow_records_when_parquet_is_absent(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    study = tmp_path / "s"
    write_synthetic_study(study, n_trials=8, n_evals=8, tracking_uri=f"sqlite:///{study}/mlflow.db")
    for name in ("evaluations", "latents"):
        shutil.rmtree(study / name)
    (study / "trials.parquet").unlink()
    result = build_report(study, log_to_mlflow=False)
    text = html_of(result)
    assert "<dt>records</dt><dd>mlflow</dd>" in text
    assert "heatmap-final-elbo.png" in {p.name for p in result.figure_paths}
    assert "No 2-D latents recorded" in text  # MLflow holds no latent tables


def section(text: str, anchor: str) -> str:
    start = text.index(f"<section id='{anchor}'>")
    return text[start:text.index("</section>", start)]


def test_objective_leads_the_summary_and_the_heatmaps(tmp_path):
    study = tmp_path / "s"
    write_synthetic_study(study, n_trials=12, n_evals=8, seed=4, grid=SMALL_GRID,
                          spec={"objective": {"metric": "kl", "mode": "min"}})
    result = build_report(study, log_to_mlflow=False)
    text = html_of(result)
    assert "<dt>objective</dt><dd>validation KL (min)</dd>" in text
    assert "validation KL (min)" in section(text, "summary")
    captions = re.findall(r"<figcaption>([^<]*)</figcaption>", section(text, "heatmaps"))
    assert captions[0].startswith("Share of seeds whose trial uses z")
    assert captions[1].startswith("final validation KL(q(z|x) ‖ p(z)) (objective, min)")
    assert "vs best KL (min)" in section(text, "configs")


def test_default_objective_is_validation_elbo_max(finished):
    text = html_of(finished[1])
    assert "<dt>objective</dt><dd>validation ELBO (max)</dd>" in text
    assert "validation ELBO (max)" in section(text, "summary")


def test_unknown_objective_is_a_report_error(tmp_path):
    study = tmp_path / "s"
    write_synthetic_study(study, n_trials=4, n_evals=4, spec={"objective": {"metric": "bleu"}})
    with pytest.raises(ReportError, match="spec.objective.metric must be one of .*'bleu'"):
        build_report(study, log_to_mlflow=False)


def test_pruning_section_says_what_pruning_did(tmp_path):
    study = tmp_path / "s"
    write_synthetic_study(study, n_trials=12, n_evals=8, seed=3, grid=SMALL_GRID, p_pruned=0.4,
                          spec={"pruning": {"pruner": "median", "phase_aware": True,
                                            "min_share": 0.25, "n_startup_trials": 5}})
    text = section(html_of(build_report(study, log_to_mlflow=False)), "pruning")
    assert "Pruner: median, phase-aware" in text and "nothing pruned before 25% of T" in text
    assert re.search(r"Steps run: [\d,]+ of 4,800 planned \(\d+%\): pruning saved \d+%", text)
    assert "<th>M</th><th>R=0</th><th>R=0.5</th><th>R=1</th>" in text
    assert re.search(r"\d of 2 pruned, at \d+ \(0\.\d+ T\)", text)
    assert "Pruned by family: M = 1" in text


def test_rate_distortion_comes_right_after_the_summary(finished):
    text = html_of(finished[1])
    rd = section(text, "rate-distortion")
    assert "<img src=\"data:image/png;base64," in rd and "equal ELBO" in rd
    assert text.index("id='summary'") < text.index("id='rate-distortion'") < text.index(
        "id='heatmaps'")


def test_an_lr_schedule_axis_keeps_its_arms_apart(tmp_path):
    study = tmp_path / "ablation"
    grid = {"n_cycles": (1, 4), "ratio": (0.5,), "ramp": ("linear",), "beta_max": (1.0,),
            "lr_schedule": ("constant", "cyclical_cosine")}  # Table 4: β × lr schedule
    write_synthetic_study(study, n_trials=12, n_evals=8, seed=2, grid=grid, p_pruned=0.0,
                          p_error=0.0)
    text = html_of(build_report(study, log_to_mlflow=False))
    configs = section(text, "configs")
    assert configs.count("<tr><td>") == 4 and "<th>lr</th>" in configs
    paired = section(text, "paired")
    assert paired.count("<tr><td>") == 2 and "cyclical_cosine" in paired
    assert "could not be drawn" not in text


def test_pooled_section_has_one_row_per_cyclical_m_and_r(finished):
    pooled = section(html_of(finished[1]), "pooled")
    assert "pooled over ramps" in pooled and "against the same seed, ramp at M = 1" in pooled
    assert pooled.count("<tr><td>") == 4  # M {2, 4} × R {0.5, 1}; R 0 has no cyclical schedule
    assert "<th>ramp</th>" not in pooled and "<th>pairs</th>" in pooled


def test_one_ramp_gets_no_pooled_section(tmp_path):
    study = tmp_path / "small"
    write_synthetic_study(study, n_trials=12, n_evals=8, seed=2, grid=SMALL_GRID, p_pruned=0.0,
                          p_error=0.0)
    assert "id='pooled'" not in html_of(build_report(study, log_to_mlflow=False))


def test_summary_json_is_written_beside_the_report(finished):
    study, result = finished
    path = result.html_path.parent / "summary.json"
    assert result.summary_path == path and path.is_file()
    summary = json.loads(path.read_text())
    assert summary["verdict"] in ("cyclical_better", "monotonic_better", "no_difference_shown")
    assert summary == json.loads(json.dumps(result.analysis.to_json()))
    n_scheduled = sum(c["uses_z"]["n"] for c in summary["cells"] if c["ratio"] > 0)
    assert sum(n for _, n in summary["uses_z"].values()) == n_scheduled > 0
    text = html_of(result)
    assert f"verdict: <code>{summary['verdict']}</code>" in section(text, "summary")
    tests = section(text, "tests")
    assert tests.count("<td>primary</td>") == 1 and "<td>secondary</td>" in tests


def test_results_table_gives_the_same_verdict_as_the_study(finished, tmp_path):
    from analysis import final_rows, load_study
    from analysis._report import build_results_report

    study, result = finished
    table = tmp_path / "trials.csv"
    final_rows(load_study(study)).to_csv(table, index=False)
    from_table = build_results_report(table, out_dir=tmp_path / "out",
                                      objective=result_objective(study))
    assert (tmp_path / "out" / "summary.json").is_file()
    assert from_table.analysis.to_json()["primary"] == result.analysis.to_json()["primary"]
    assert from_table.analysis.verdict == result.analysis.verdict
    names = {p.name for p in from_table.figure_paths}
    assert "heatmap-final-uses_z.png" in names and "curves.png" not in names


def result_objective(study):
    from analysis._noise import objective_of

    return objective_of(json.loads((study / "study.json").read_text()))
