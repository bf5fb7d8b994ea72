"""The real entrypoint, end to end on CPU: artifacts, the checkpoint contract, exact resume, refusals, sweeps."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import ROOT, TINY, TINY_GPT2, assert_ok, clean_env, compose_validated, tiny_run
from trainer.base.errors import UserError
from trainer.checkpoint import REQUIRED_KEYS, SIDECAR_REQUIRED_KEYS

pytestmark = pytest.mark.slow


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def train_losses(run_dir: Path) -> dict[int, float]:
    return {row["step"]: row["train/loss"] for row in metrics(run_dir) if "train/loss" in row}


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name


def test_dense_shakedown_end_to_end_writes_the_seed_contract(tmp_path, data_cache):
    result = tiny_run(tmp_path, data_cache, "preset=shakedown", "train.max_steps=6", "train.eval_every=3",
                      "checkpoint.save_every=2", "checkpoint.keep_last_k=2", "checkpoint.keep_last_snapshots=2",
                      name="shake")
    assert_ok(result)
    run_dir = tmp_path / "shake"
    assert "run directory:" in result.stdout and str(run_dir / "final-model.safetensors") in result.stdout

    # keep_last_k=2 of the checkpoints at 2, 4, 6, and keep_last_snapshots=2 of their model snapshots.
    assert sorted(p.name for p in run_dir.glob("ckpt-step-*.pt")) == ["ckpt-step-4.pt", "ckpt-step-6.pt"]
    for stem in ("model-step-4", "model-step-6", "best-model", "final-model"):
        assert (run_dir / f"{stem}.safetensors").is_file() and (run_dir / f"{stem}.json").is_file(), stem
    assert not list(run_dir.glob("model-step-2.*"))
    assert not [p for p in run_dir.iterdir() if ".tmp" in p.name], "no temporary files left behind"

    ckpt = torch.load(run_dir / "ckpt-step-6.pt", map_location="cpu", weights_only=True)
    assert set(REQUIRED_KEYS) <= set(ckpt)
    assert (ckpt["format_version"], ckpt["step"], ckpt["preset"], ckpt["mode"]) == (1, 6, "shakedown", "dense")
    assert ckpt["config"]["run"]["preset"] == "shakedown" and "data_state" in ckpt

    sidecar = json.loads((run_dir / "model-step-4.json").read_text())
    assert set(SIDECAR_REQUIRED_KEYS) <= set(sidecar)
    assert sidecar["step"] == 4 and sidecar["mode"] == "dense" and sidecar["architecture"]["n_layer"] == 2

    rows = metrics(run_dir)
    losses = train_losses(run_dir)
    assert sorted(losses) == [1, 2, 3, 4, 5, 6], "train loss every step"
    evals = [r for r in rows if "eval/loss" in r]
    assert [r["step"] for r in evals] == [3, 6]
    assert {"eval/code/loss", "eval/math/loss", "eval/prose/loss", "eval/ppl"} <= set(evals[-1])
    assert all(torch.isfinite(torch.tensor(v)) for v in losses.values())

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["final_step"] == 6
    best = json.loads((run_dir / "best-model.json").read_text())
    assert best["metrics_summary"]["eval/loss"] == pytest.approx(min(r["eval/loss"] for r in evals))
    assert (run_dir / "resolved_config.yaml").is_file() and (run_dir / ".hydra" / "config.yaml").is_file()

    # A dense run has no routing: no figures at its end, and the analysis CLI says so in one line.
    assert not (run_dir / "figures").exists()
    analysed = subprocess.run([sys.executable, "-m", "eval.analyze", str(run_dir)], cwd=ROOT, env=clean_env(),
                              capture_output=True, text=True)
    assert analysed.returncode == 0 and analysed.stdout == f"{run_dir}: a dense run has no routing to analyse\n"


def test_resume_from_step_n_equals_an_uninterrupted_run(tmp_path, data_cache):
    common = ["train.max_steps=6", "train.eval_every=3", "checkpoint.save_every=3", "model.dropout=0.1"]
    assert_ok(tiny_run(tmp_path, data_cache, *common, name="whole"))
    whole = tmp_path / "whole"
    assert_ok(tiny_run(tmp_path, data_cache, *common, f"run.resume={whole / 'ckpt-step-3.pt'}", name="resumed"))
    resumed = tmp_path / "resumed"

    original, continued = train_losses(whole), train_losses(resumed)
    assert sorted(continued) == [4, 5, 6]
    assert all(continued[s] == original[s] for s in (4, 5, 6)), (original, continued)
    assert_same_weights(whole / "final-model.safetensors", resumed / "final-model.safetensors")
    summary = json.loads((resumed / "summary.json").read_text())
    assert summary["resumed_from"].endswith("ckpt-step-3.pt") and summary["final_step"] == 6


def test_resume_auto_picks_the_newest_valid_checkpoint(tmp_path, data_cache):
    args = ["train.max_steps=4", "train.eval_every=2", "checkpoint.save_every=2"]
    assert_ok(tiny_run(tmp_path, data_cache, *args, name="auto"))
    run_dir = tmp_path / "auto"
    reference = tmp_path / "reference.safetensors"
    shutil.copy(run_dir / "final-model.safetensors", reference)

    # A crash while writing step 4: its checkpoint is torn (truncated), so auto must fall back to step 2.
    newest = run_dir / "ckpt-step-4.pt"
    newest.write_bytes(newest.read_bytes()[:100])
    (run_dir / "final-model.safetensors").unlink()
    # ...and a SIGKILL mid-save, which runs no cleanup: the temporaries stay behind until the next start.
    killed_save = run_dir / ".ckpt-step-4.pt.x7k2q.tmp"
    killed_save.write_bytes(b"partial")
    (run_dir / "ckpt-step-4.deepspeed.tmp" / "state").mkdir(parents=True)

    refused = tiny_run(tmp_path, data_cache, *args, name="auto")
    assert refused.returncode == 2 and "run.resume=auto" in refused.stderr

    result = tiny_run(tmp_path, data_cache, *args, "run.resume=auto", name="auto")
    assert_ok(result)
    assert not killed_save.exists() and not (run_dir / "ckpt-step-4.deepspeed.tmp").exists()
    assert "interrupted save" in result.stdout + result.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["resumed_from"].endswith("ckpt-step-2.pt")
    assert_same_weights(reference, run_dir / "final-model.safetensors")
    assert sorted(train_losses(run_dir)) == [1, 2, 3, 4], "metrics.jsonl reads as one run"

    fresh = tiny_run(tmp_path, data_cache, *args, "run.resume=auto", name="never-ran")
    assert_ok(fresh)


def test_resume_auto_refuses_to_start_over_a_run_whose_checkpoints_all_fail_to_load(tmp_path, data_cache):
    run_dir = tmp_path / "torn"
    run_dir.mkdir()
    (run_dir / "ckpt-step-4.pt").write_bytes(b"PK\x03\x04 cut short")
    result = tiny_run(tmp_path, data_cache, "train.max_steps=2", "run.resume=auto", name="torn")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "ckpt-step-4.pt" in result.stderr.splitlines()[-1]
    assert sorted(path.name for path in run_dir.iterdir() if not path.name.startswith(".")) == [
        "ckpt-step-4.pt", "run.log"]


def test_checkpoints_after_the_resumed_step_are_never_picked_over_the_resumed_runs(tmp_path, data_cache):
    """keep_last_k keeps the highest steps and run.resume=auto takes the highest that loads, so a checkpoint
    left from beyond the resumed step would crowd out the resumed run's own and be picked after its next stop."""
    args = ["train.max_steps=4", "train.eval_every=2", "checkpoint.save_every=2"]
    assert_ok(tiny_run(tmp_path, data_cache, *args, name="later"))
    run_dir = tmp_path / "later"

    # Rolling back to step 2 with a readable step-4 checkpoint in the directory: refused, naming it.
    rollback = tiny_run(tmp_path, data_cache, *args, f"run.resume={run_dir / 'ckpt-step-2.pt'}", name="later")
    assert rollback.returncode == 2 and "Traceback" not in rollback.stderr
    assert "ckpt-step-4.pt" in rollback.stderr.splitlines()[-1]

    # A torn step-4 checkpoint (a save cut short): auto resumes from step 2 and removes it, so the resumed
    # run's step-3 checkpoint is kept rather than pruned in favour of a file that cannot load.
    newest = run_dir / "ckpt-step-4.pt"
    newest.write_bytes(newest.read_bytes()[:100])
    resumed = tiny_run(tmp_path, data_cache, "train.max_steps=3", "checkpoint.save_every=1",
                       "checkpoint.keep_last_k=1", "run.resume=auto", name="later")
    assert_ok(resumed)
    assert [path.name for path in sorted(run_dir.glob("ckpt-step-*.pt"))] == ["ckpt-step-3.pt"]


def test_resume_refuses_other_architecture_and_format(tmp_path, data_cache):
    assert_ok(tiny_run(tmp_path, data_cache, "train.max_steps=2", "checkpoint.save_every=2", name="base"))
    ckpt_path = tmp_path / "base" / "ckpt-step-2.pt"

    wider = tiny_run(tmp_path, data_cache, "train.max_steps=4", "model.n_embd=64", f"run.resume={ckpt_path}",
                     name="wider")
    assert wider.returncode == 2
    assert "n_embd" in wider.stderr and "Traceback" not in wider.stderr

    future = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    future["format_version"] = 2
    future_path = tmp_path / "ckpt-step-2-v2.pt"
    torch.save(future, future_path)
    newer = tiny_run(tmp_path, data_cache, "train.max_steps=4", f"run.resume={future_path}", name="v2")
    assert newer.returncode == 2 and "format_version" in newer.stderr

    missing = tiny_run(tmp_path, data_cache, f"run.resume={tmp_path / 'nope.pt'}", name="missing")
    assert missing.returncode == 2 and "nope.pt" in missing.stderr

    # Refused launches into the existing run, with and without resume, keep its record of what it trained.
    record = (tmp_path / "base" / "resolved_config.yaml").read_bytes()
    for resume in (["run.resume=auto"], []):
        refused = tiny_run(tmp_path, data_cache, "train.max_steps=4", "model.n_embd=64", *resume, name="base")
        assert refused.returncode == 2, refused.stderr
    assert (tmp_path / "base" / "resolved_config.yaml").read_bytes() == record
    assert (tmp_path / "base" / "ckpt-step-2.pt").is_file()

    # A refused new run leaves no directory behind, though it got as far as logging and data preparation...
    too_small = tiny_run(tmp_path, data_cache, "data.size_mb=0.0001", name="too-small")
    assert too_small.returncode == 2 and "data.size_mb" in too_small.stderr
    assert not (tmp_path / "too-small").exists()
    # ...and a refused (wider) resume into a new name leaves nothing either; the missing checkpoint's neither.
    assert not (tmp_path / "wider").exists() and not (tmp_path / "missing").exists()


def test_wandb_online_unreachable_falls_back_to_offline_and_trains(tmp_path, data_cache):
    env = clean_env(WANDB_BASE_URL="http://127.0.0.1:9", WANDB_API_KEY="x" * 40, WANDB_DIR=str(tmp_path))
    result = tiny_run(tmp_path, data_cache, "train.max_steps=2", "tracking.wandb_mode=online",
                      "tracking.online_timeout_s=10", name="wb", env=env)
    assert_ok(result)
    summary = json.loads((tmp_path / "wb" / "summary.json").read_text())
    assert summary["wandb_mode"] == "offline" and summary["status"] == "completed"
    assert summary["wall_time_s"] < 60


def test_multirun_gives_each_job_its_own_directory_and_survives_a_failing_job(tmp_path, data_cache):
    result = tiny_run(tmp_path, data_cache, "--multirun", "preset=shakedown,quickstart", "train.max_steps=2",
                      "train.eval_every=2", "checkpoint.save_every=2", "tracking.wandb_mode=offline",
                      "hydra.sweep.dir=multirun/sweep-a", name=None, env=clean_env(WANDB_DIR=str(tmp_path)))
    assert_ok(result)
    summaries = sorted((tmp_path / "multirun").rglob("summary.json"))
    assert len(summaries) == 2
    assert {json.loads(p.read_text())["preset"] for p in summaries} == {"shakedown", "quickstart"}
    assert sorted(p.parent.name for p in summaries) == ["0_shakedown-dense", "1_quickstart"]
    for job in ("0_shakedown-dense", "1_quickstart"):  # on W&B, told apart by directory and grouped by sweep
        log = (tmp_path / "multirun" / "sweep-a" / job / "run.log").read_text()
        assert f"W&B offline run '{job}' in group 'sweep-a'" in log

    mixed = tiny_run(tmp_path / "second", data_cache, "--multirun", "optim.learning_rate=-1,0.001,-2",
                     "train.max_steps=2", "checkpoint.save_every=2")
    assert mixed.returncode != 0
    assert "optim.learning_rate=-1" in mixed.stderr
    survivors = list((tmp_path / "second" / "multirun").rglob("summary.json"))
    assert len(survivors) == 1, "the valid job still ran"
    # Hydra names only the first failure at the end; each refused job is named as it fails, and in its run.log.
    output = mixed.stdout + mixed.stderr
    assert "job #0 (" in output and "job #2 (" in output and "optim.learning_rate=-2.0 is impossible" in output
    (third_log,) = (tmp_path / "second" / "multirun").rglob("2_*/run.log")
    assert "optim.learning_rate=-2.0 is impossible" in third_log.read_text()

    # The sweep's report: a row per job, refused ones with their one line, and only the override that differed.
    (sweep,) = (tmp_path / "second" / "multirun").iterdir()
    with (sweep / "report.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["job"], r["optim.learning_rate"], r["status"]) for r in rows] == [
        ("0_run", "-1", "refused"), ("1_run", "0.001", "completed"), ("2_run", "-2", "refused")]
    assert rows[2]["why"].startswith("optim.learning_rate=-2.0 is impossible")
    assert not {"train.max_steps", "checkpoint.save_every", "run.name"} & set(rows[0]), "shared, so not columns"
    assert float(rows[1]["final_eval_loss"]) > 0 and rows[1]["steps"] == "2"
    report = (sweep / "report.md").read_text()
    assert "Baseline: `1_run`" in report and "refused: optim.learning_rate=-1.0 is impossible" in report
    assert {"eval_loss.png", "train_loss.png"} <= {p.name for p in sweep.iterdir()}
    assert "routing.png" not in {p.name for p in sweep.iterdir()}, "dense runs have no routing to draw"


def test_a_sweep_relaunched_into_its_directory_finishes_only_the_unfinished_jobs(tmp_path, data_cache):
    args = ["--multirun", "train.max_steps=2", "checkpoint.save_every=2", "train.eval_every=2"]
    first = tiny_run(tmp_path, data_cache, *args, "optim.learning_rate=0.001,-1")  # job 1 refused
    assert first.returncode != 0
    (done,) = (tmp_path / "multirun").rglob("summary.json")
    sweep_dir = done.parent.parent
    before = done.read_bytes()

    # Relaunched without its directory, auto-resume would start a new sweep from scratch: say so.
    unpinned = tiny_run(tmp_path / "unpinned", data_cache, *args, "optim.learning_rate=-1", "run.resume=auto")
    assert "hydra.sweep.dir=<that sweep's directory>" in unpinned.stdout + unpinned.stderr

    again = tiny_run(tmp_path, data_cache, *args, "optim.learning_rate=0.001,0.002", "run.resume=auto",
                     f"hydra.sweep.dir={sweep_dir}")
    assert_ok(again)
    assert "hydra.sweep.dir=<that sweep's directory>" not in again.stdout + again.stderr
    assert "already completed at step 2" in again.stdout + again.stderr
    assert done.read_bytes() == before, "the finished job is left alone"
    assert sorted(p.parent.name for p in sweep_dir.rglob("summary.json")) == ["0_run", "1_run"]
    assert len(list((tmp_path / "multirun").iterdir())) == 1, "no new sweep directory"


def test_logging_cadences_and_eval_at_start(tmp_path, data_cache):
    result = tiny_run(tmp_path, data_cache, "train.max_steps=4", "train.log_every=2", "train.eval_every=4",
                      "train.eval_at_start=true", "checkpoint.save_every=4", name="cadence")
    assert_ok(result)
    rows = metrics(tmp_path / "cadence")
    assert sorted(train_losses(tmp_path / "cadence")) == [2, 4]
    assert [r["step"] for r in rows if "eval/loss" in r] == [0, 4], "an eval before the first step, then at 4"


def test_torch_compile_trains_like_eager_and_saves_plain_names(tmp_path, data_cache):
    args = ["train.max_steps=3", "train.eval_every=3", "checkpoint.save_every=3"]
    assert_ok(tiny_run(tmp_path, data_cache, *args, name="eager"))
    assert_ok(tiny_run(tmp_path, data_cache, *args, "hardware.compile=true", name="compiled"))
    eager, compiled = train_losses(tmp_path / "eager"), train_losses(tmp_path / "compiled")
    assert compiled == pytest.approx(eager, rel=1e-4)
    names = weights(tmp_path / "compiled" / "final-model.safetensors").keys()
    assert names == weights(tmp_path / "eager" / "final-model.safetensors").keys()
    assert not any("_orig_mod" in n for n in names), "checkpoints must not depend on how the model ran"


def test_a_run_seed_sweep_keeps_one_eval_split_and_tokenizer(tmp_path, data_cache):
    def data_of(name: str, *overrides: str) -> list:
        assert_ok(tiny_run(tmp_path, data_cache, "train.max_steps=1", *overrides, name=name))
        summary = json.loads((tmp_path / name / "data_summary.json").read_text())
        return [summary["tokenizer"]["fingerprint"], summary["split_seed"],
                {d: v["eval"] for d, v in summary["domains"].items()}]

    seed1, seed2 = data_of("seed1", "run.seed=1"), data_of("seed2", "run.seed=2")
    assert seed1 == seed2, "run.seed must not move the eval split or retrain the tokenizer"
    assert train_losses(tmp_path / "seed1") != train_losses(tmp_path / "seed2"), "run.seed still seeds the model"
    other_split = data_of("split3", "data.split_seed=3")
    assert other_split[0] != seed1[0] and other_split[1] == 3


def test_resuming_a_completed_run_leaves_its_artifacts_alone(tmp_path, data_cache):
    args = ["train.max_steps=2", "checkpoint.save_every=2"]
    assert_ok(tiny_run(tmp_path, data_cache, *args, name="done"))
    run_dir = tmp_path / "done"
    watched = [run_dir / name for name in ("summary.json", "final-model.safetensors", "metrics.jsonl")]
    before = [(p.read_bytes(), p.stat().st_mtime_ns) for p in watched]

    again = tiny_run(tmp_path, data_cache, *args, "run.resume=auto", name="done")  # a sweep re-launched
    assert_ok(again)
    assert "already completed at step 2" in again.stdout + again.stderr
    assert [(p.read_bytes(), p.stat().st_mtime_ns) for p in watched] == before


def test_a_finished_run_relaunched_unchanged_builds_no_data_or_model(tmp_path, data_cache, monkeypatch):
    """A re-launched sweep skips its finished jobs at once; a changed architecture is still refused."""
    import trainer.fit as fit

    base = [*TINY_GPT2, *TINY, f"data.cache_dir={data_cache}", "train.max_steps=2", "checkpoint.save_every=2"]
    run_dir = tmp_path / "run"
    assert fit.train(compose_validated(base), run_dir)["status"] == "completed"

    def must_not_build(*args, **kwargs):
        raise AssertionError("a finished, unchanged run built its data")

    with monkeypatch.context() as patch:
        patch.setattr(fit, "build_data", must_not_build)
        again = fit.train(compose_validated([*base, "run.resume=auto"]), run_dir)
    assert again == json.loads((run_dir / "summary.json").read_text())
    with pytest.raises(UserError, match=r"n_layer=2 but this run is \S*n_layer=3; resume it with model.n_layer=2"):
        fit.train(compose_validated([*base, "run.resume=auto", "model.n_layer=3"]), run_dir)

    # The final checkpoint deleted to redo the tail from an earlier one: that is what happens.
    redo = [*base, "train.max_steps=4"]
    fit.train(compose_validated(redo), tmp_path / "redo")
    (tmp_path / "redo" / "ckpt-step-4.pt").unlink()
    again = fit.train(compose_validated([*redo, "run.resume=auto"]), tmp_path / "redo")
    assert again["final_step"] == 4 and again["resumed_from"].endswith("ckpt-step-2.pt")
    # Without a final checkpoint the newest one is older than the end: still finished, nothing retrained.
    no_final = [*base, "train.max_steps=3", "checkpoint.save_final=false"]
    assert fit.train(compose_validated(no_final), tmp_path / "no-final")["status"] == "completed"
    watched = [tmp_path / "no-final" / name for name in ("summary.json", "metrics.jsonl")]
    before = [p.read_bytes() for p in watched]
    again = fit.train(compose_validated([*no_final, "run.resume=auto"]), tmp_path / "no-final")
    assert again["final_step"] == 3 and [p.read_bytes() for p in watched] == before
