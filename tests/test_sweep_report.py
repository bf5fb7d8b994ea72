"""The sweep report (eval/report, `python -m eval.compare`) over run directories written here as runs write them:
rows and statuses, the differing overrides, the baseline, the family columns and the figures. The reports of real
sweeps through the CLI are in test_train_e2e, test_moe_family and test_stop_signals."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml

from eval.compare import main as compare
from eval.report.jobs import parse_overrides
from models.moe import report as moe_report
from models.moe import stats as moe_stats
from models.polyglu import stats as polyglu_stats
from models.report import RunRecord
from trainer.base import metrics as keys

DOMAINS = ("code", "prose")
MOE = {"family": "moe", "moe_layers": [1], "num_experts": 4, "topk": 1, "collapse_threshold": 0.6}


def eval_row(step: int, loss: float, **routing: float) -> dict:
    row = {"step": step, keys.EVAL_LOSS: loss}
    for i, domain in enumerate(DOMAINS):
        row[keys.eval_loss(domain)] = loss + 0.1 * i
        row.update({keys.eval_router(domain, stat): value for stat, value in routing.items()})
    return row


def moe_rows(shares: list[float], losses: list[float]) -> list[dict]:
    """Per step: the largest of four experts' fractions in layer 1 is `share` (the rest split the remainder)."""
    rows = []
    for step, (share, loss) in enumerate(zip(shares, losses, strict=True), start=1):
        rest = (1 - share) / 3
        fractions = {f"{keys.router(moe_stats.fraction(1))}/{e}": share if e == 0 else rest for e in range(4)}
        rows.append({"step": step, keys.TRAIN_LM_LOSS: loss, keys.train_metric(moe_stats.LB_LOSS): 1 + share,
                     keys.TOKENS_PER_SEC: 1000.0, **fractions})
    rows.append({**eval_row(len(shares), losses[-1]),
                 keys.eval_router_across_domains(moe_stats.domain_information_normalised(1)): 0.25})
    return rows


def write_run(run_dir: Path, overrides: list[str], model: dict | None = None, summary: dict | None = None,
              rows: list[dict] | None = None, failure: dict | None = None, trained: bool = True) -> Path:
    """What trainer/run.py leaves: Hydra's .hydra/, then (once it trains) resolved_config.yaml, metrics.jsonl and,
    at the end, summary.json; failure.json from a sweep job that raised."""
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    config = {"run": {"task": "train"}, "model": model or {"family": "dense"}, "train": {"max_steps": 4}}
    (run_dir / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    if trained:
        (run_dir / "resolved_config.yaml").write_text(yaml.safe_dump(config))
    if rows is not None:
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 5, "tr')
    if summary is not None:
        (run_dir / "summary.json").write_text(json.dumps({"mode": config["model"]["family"], "final_step": 4,
                                                          "max_steps": 4, "tokens_seen": 4096, "wall_time_s": 75.0,
                                                          "n_parameters": 1_500_000, **summary}))
    if failure is not None:
        (run_dir / "failure.json").write_text(json.dumps(failure))
    return run_dir


def read_csv(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


@pytest.fixture
def sweep(tmp_path) -> Path:
    """A sweep of five jobs, one of each outcome; every job shares two overrides and differs in preset (one job
    also in lr)."""
    sweep = tmp_path / "multirun" / "2026-12-02_10-00-00"
    common = ["train.max_steps=4", "data.size_mb=1"]
    write_run(sweep / "0_dense", ["preset=dense", *common], summary={"status": "completed"},
              rows=[eval_row(2, 5.0), {"step": 3, keys.TRAIN_LM_LOSS: 4.5, keys.TOKENS_PER_SEC: 2000.0},
                    eval_row(4, 4.0)])
    write_run(sweep / "1_moe-main", ["preset=moe-main", *common], model=MOE, summary={"status": "completed"},
              rows=moe_rows([0.3, 0.7, 0.8, 0.9], [4.4, 4.2, 4.0, 3.9]))
    write_run(sweep / "2_no-lb", ["preset=no-lb", *common, "optim.learning_rate=0.01"], model=MOE,
              summary={"status": "stopped_early", "stop_reason": "routing collapse: expert 0 of layer 1 took 90%"},
              rows=moe_rows([0.7, 0.5, 0.9, 0.95], [4.4, 4.3, 4.3, 4.2]))
    write_run(sweep / "3_top2", ["preset=top2", *common], model={**MOE, "topk": 2}, trained=False,
              failure={"status": "refused", "error": "model.topk=2 must be between 1 and model.num_experts=1"})
    write_run(sweep / "10_moe-main", ["preset=moe-main", *common], model=MOE, rows=moe_rows([0.3], [4.6]))
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    return sweep


def test_a_sweep_report_has_a_row_per_job_with_its_status_and_only_the_overrides_that_differ(sweep, capsys):
    assert compare([str(sweep)]) == 0
    printed = capsys.readouterr().out
    assert "| job | `preset` | `optim.learning_rate` | family | status |" in printed
    assert "Every job: `train.max_steps=4 data.size_mb=1`" in printed

    rows = read_csv(sweep / "report.csv")
    assert [r["job"] for r in rows] == ["0_dense", "1_moe-main", "2_no-lb", "3_top2", "10_moe-main"], "job order"
    assert [r["preset"] for r in rows] == ["dense", "moe-main", "no-lb", "top2", "moe-main"]
    assert [r["optim.learning_rate"] for r in rows] == ["", "", "0.01", "", ""]
    assert "train.max_steps" not in rows[0] and "data.size_mb" not in rows[0]
    assert [r["status"] for r in rows] == ["completed", "completed", "stopped_early", "refused", "interrupted"]
    assert rows[2]["why"].startswith("routing collapse") and rows[3]["why"].startswith("model.topk=2")
    assert "killed" in rows[4]["why"] and rows[4]["steps"] == "1", "no summary: what metrics.jsonl holds"
    assert [r["family"] for r in rows] == ["dense", "moe", "moe", "moe", "moe"], "a refused job: Hydra's config"

    dense, main = rows[0], rows[1]
    assert (dense["best_eval_loss"], dense["final_eval_loss"], dense["vs_baseline_pct"]) == ("4.0", "4.0", "")
    assert float(dense["eval_prose_best"]) == pytest.approx(4.1) and float(dense["eval_code_final"]) == 4.0
    assert float(main["vs_baseline_pct"]) == pytest.approx(-2.5), "3.9 against the baseline's 4.0"
    assert (dense["tokens"], dense["wall_time_s"], dense["parameters"], dense["tokens_per_s"]) == (
        "4096", "75.0", "1500000", "2000.0")
    # MoE columns: the last lb loss, the largest share, the collapse that held, the information; blank for dense.
    assert float(main["lb_loss"]) == pytest.approx(1.9) and float(main["max_expert_share"]) == pytest.approx(0.9)
    assert (main["collapse_step"], rows[2]["collapse_step"], float(main["domain_mi_norm"])) == ("2", "3", 0.25)
    assert dense["lb_loss"] == dense["collapse_step"] == ""

    markdown = (sweep / "report.md").read_text()
    assert markdown == printed.split("\nwrote ")[0]
    assert "refused: model.topk=2 must be between" in markdown and "| baseline |" in markdown
    assert "stopped early: routing collapse" in markdown and "1m 15s" in markdown and "| -2.50% |" in markdown
    assert "## Routing" in markdown and "`collapse_step`: the step from which" in markdown
    for figure in ("eval_loss.png", "train_loss.png", "routing.png"):
        assert (sweep / figure).stat().st_size > 10_000 and f"![{figure}]({figure})" in markdown


def test_the_baseline_is_the_first_job_with_an_eval_loss_or_the_one_named(sweep, tmp_path, capsys):
    (sweep / "0_dense" / "metrics.jsonl").write_text("")  # job 0 has no eval yet: job 1 is the baseline
    assert compare([str(sweep)]) == 0
    assert "Baseline: `1_moe-main`" in (sweep / "report.md").read_text()
    for name in ("2", "no-lb", "2_no-lb"):
        assert compare([str(sweep), "--baseline", name, "--output", str(tmp_path / name)]) == 0
        rows = read_csv(tmp_path / name / "report.csv")
        assert rows[2]["vs_baseline_pct"] == "" and float(rows[1]["vs_baseline_pct"]) == pytest.approx(
            100 * (3.9 - 4.2) / 4.2)
    capsys.readouterr()
    assert compare([str(sweep), "--baseline", "moe-main"]) == 2
    assert "names 2 jobs (1_moe-main, 10_moe-main); give one job's full name" in capsys.readouterr().err
    assert compare([str(sweep), "--baseline", "7"]) == 2
    assert "--baseline '7' names none of the compared jobs; pick one of: 0_dense, 1_moe-main" in capsys.readouterr().err


def test_runs_from_separate_launches_are_compared_beside_them_and_bad_paths_refused(sweep, tmp_path, capsys):
    outputs = tmp_path / "outputs"
    write_run(outputs / "dense", [], summary={"status": "completed"}, rows=[eval_row(4, 4.0)])
    write_run(outputs / "moe", ["model=moe"], model=MOE, summary={"status": "completed"},
              rows=moe_rows([0.3, 0.4], [4.2, 4.1]))
    assert compare([str(outputs / "dense"), str(outputs / "moe"), str(sweep / "1_moe-main")]) == 0
    rows = read_csv(tmp_path / "comparison" / "report.csv")
    assert [r["job"] for r in rows] == ["outputs/dense", "outputs/moe", "multirun/2026-12-02_10-00-00/1_moe-main"]
    assert [r["model"] for r in rows] == ["", "moe", ""] and "preset" in rows[0], "overrides told apart by absence"

    capsys.readouterr()
    assert compare([str(tmp_path / "nowhere")]) == 2
    assert "nowhere does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert compare([str(tmp_path / "empty")]) == 2
    assert "is neither a run directory" in capsys.readouterr().err
    assert compare([str(outputs / "dense"), str(outputs / "dense")]) == 2
    assert "the same run is given twice" in capsys.readouterr().err


def test_polyglu_columns_and_curves_come_from_the_run_record():
    from models.polyglu import report as polyglu_report

    dynamic = dict(zip(DOMAINS, (0.2, 0.4), strict=True))
    rows = [{"step": 1, keys.train_metric(polyglu_stats.TAU): 0.5},
            {"step": 2, keys.train_metric(polyglu_stats.TAU): 0.1, keys.EVAL_LOSS: 3.0,
             **{keys.eval_router(d, polyglu_stats.DYNAMIC_ENTROPY_MEAN): v for d, v in dynamic.items()},
             **{keys.eval_router(d, polyglu_stats.STATIC_ENTROPY_MEAN): 1.3 for d in DOMAINS}}]
    record = RunRecord(model_config={"family": "polyglu"}, rows=rows)
    assert polyglu_report.columns(record) == pytest.approx({"tau": 0.1, "static_entropy": 1.3, "dynamic_entropy": 0.3})
    assert list(polyglu_report.curves(record).values()) == [[(2, pytest.approx(0.3))]]
    assert set(polyglu_report.columns(record)) == set(polyglu_report.COLUMNS), "every column has its legend"
    assert set(moe_report.columns(RunRecord(MOE, []))) == set(moe_report.COLUMNS)
    assert polyglu_report.columns(RunRecord({}, [])) == {"tau": None, "static_entropy": None,
                                                         "dynamic_entropy": None}, "a run that logged nothing"


def test_a_collapse_is_dated_from_when_it_held_not_from_a_passing_spike():
    assert moe_report.collapse_step([(50, 0.9), (100, 0.3), (150, 0.7), (200, 0.8)], 0.6) == 150
    assert moe_report.collapse_step([(50, 0.9), (100, 0.3)], 0.6) is None
    assert moe_report.collapse_step([], 0.6) is None
    # top-2: the logged fraction is a share of the 2N assignments; times k it is the share of tokens.
    record = RunRecord({**MOE, "topk": 2}, moe_rows([0.45], [4.0]))
    assert moe_report.largest_share(record) == [(1, pytest.approx(0.9))]


def test_hydra_overrides_are_read_as_keys_and_values():
    assert parse_overrides(["preset=dense", "+model.x=1", "++a=b=c", "~train.epochs"]) == {
        "preset": "dense", "model.x": "1", "a": "b=c", "train.epochs": "(deleted)"}
