"""The GPU check (benchmarks/gpu/run.sh) on a machine without a GPU: its dry run says what it would run and writes
its summary, and the parts of its scripts that need no GPU do what the GPU run relies on (the micro-batch search,
one PolyGLU training step, the MoE measurement with the sorted variant, the summary's verdicts)."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from trainer.config.validate import compose_config

ROOT = Path(__file__).resolve().parents[1]
GPU = ROOT / "benchmarks" / "gpu"


def script(path: Path, name: str):
    """A benchmark script as a module, loaded from its file: benchmarks/ is not a package, and two scripts share
    a file name (benchmarks/moe_layer.py and benchmarks/gpu/moe_layer.py), so an import by name could get either."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


moe_layer = script(ROOT / "benchmarks" / "moe_layer.py", "bench_moe_layer")
trainer_overhead = script(ROOT / "benchmarks" / "trainer_overhead.py", "bench_trainer_overhead")
polyglu_mfu = script(GPU / "polyglu_mfu.py", "gpu_polyglu_mfu")
summarize = script(GPU / "summarize.py", "gpu_summarize")


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash, timeout")
def test_dry_run_says_what_it_would_run_and_writes_its_summary(tmp_path):
    out = tmp_path / "gpu"
    proc = subprocess.run(["bash", str(GPU / "run.sh"), "--dry-run", "--out", str(out)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    said = proc.stdout
    for part in ("install", "env", "tests", "polyglu_mfu", "moe_layer", "trainer_overhead", "summary"):
        assert f"== {part}" in said, part
    assert "dry run: not installing" in said
    assert "would measure preset=polyglu-pretrain (597,153,888 parameters" in said
    assert "would time one MoE layer" in said and "would time the trainer against a bare loop" in said

    summary = json.loads(said.strip().splitlines()[-1])
    assert summary == json.loads((out / "gpu_check.json").read_text())
    assert summary["dry_run"] is True and summary["all_claims_met"] is None
    assert set(summary["claims"]) == set(summarize.CLAIMS)
    assert all(claim["met"] is None for claim in summary["claims"].values())  # nothing measured, nothing claimed
    assert all(code == 0 for code in summary["exit_codes"].values()), summary["exit_codes"]
    planned = summary["cuda_tests_planned"]
    assert any("test_cuda.py::test_varlen_attention_equals_masked_sdpa" in t for t in planned)
    assert any("test_cuda.py::test_exact_resume_on_cuda_in_fp32" in t for t in planned)
    assert any("test_moe_grouped_mm.py" in t for t in planned)
    assert summary["parts"]["polyglu_mfu"]["parameters"] == 597_153_888


def test_run_sh_refuses_a_missing_out_and_unknown_arguments(tmp_path):
    missing = subprocess.run(["bash", str(GPU / "run.sh"), "--dry-run"], capture_output=True, text=True)
    assert missing.returncode == 2 and "--out DIR is required" in missing.stderr
    unknown = subprocess.run(["bash", str(GPU / "run.sh"), "--out", str(tmp_path), "--fast"], capture_output=True,
                             text=True)
    assert unknown.returncode == 2 and "unknown argument '--fast'" in unknown.stderr


def test_wheels_txt_covers_what_the_project_imports_beyond_a_cuda_image():
    """hydra-core, omegaconf and antlr4 (a config cannot compose without them) are pinned to what pyproject allows."""
    from packaging.requirements import Requirement

    wanted = {r.name: r.specifier for r in (Requirement(line) for line in (GPU / "wheels.txt").read_text().splitlines()
                                            if line and not line.startswith("#"))}
    assert {"hydra-core", "omegaconf", "antlr4-python3-runtime", "setuptools"} <= set(wanted)
    assert str(wanted["antlr4-python3-runtime"]) == "==4.9.3" and wanted["hydra-core"].contains("1.3.2")
    assert "torch" not in wanted  # never reinstalled


def test_the_micro_batch_search_doubles_then_tries_once_between():
    class Fake:
        def __init__(self, limit):
            self.limit, self.tried = limit, []

        def fits(self, b):
            self.tried.append(b)
            return b <= self.limit

    fake = Fake(13)
    assert polyglu_mfu.largest_micro_batch(fake, 2, 128) == 12
    assert fake.tried == [2, 4, 8, 16, 12]
    assert polyglu_mfu.largest_micro_batch(Fake(0), 2, 128) == 0
    assert polyglu_mfu.largest_micro_batch(Fake(1000), 2, 64) == 64  # capped: never past --max-batch


def test_timed_steps_halve_the_micro_batch_when_a_later_step_runs_out_of_memory():
    class Fake:
        def __init__(self, limit):
            self.limit, self.steps, self.forgotten = limit, [], 0

        def step(self, b):
            self.steps.append(b)
            if b > self.limit:
                raise torch.OutOfMemoryError("CUDA out of memory")

        def forget_failed_step(self):
            self.forgotten += 1

    class Args:
        warmup, steps = 1, 2

    fake = Fake(6)
    seconds, halvings = polyglu_mfu.timed_steps(fake, 12, Args)
    assert halvings == 1 and len(seconds) == 2 and fake.steps == [12, 6, 6, 6] and fake.forgotten == 1
    with pytest.raises(RuntimeError, match="out of memory at 4 rows"):
        polyglu_mfu.timed_steps(Fake(0), 4, Args)


def test_a_polyglu_training_step_on_packed_documents_runs_on_cpu():
    cfg = compose_config(["model=polyglu", "model.d_model=32", "model.d_ff=64", "model.n_layers=2", "model.n_heads=4",
                          "model.n_kv_heads=2", "model.head_dim=8", "model.max_seq_len=64", "data.block_size=64"])
    trainer = polyglu_mfu.Trainer(cfg, vocab=97, device="cpu")
    before = [p.detach().clone() for p in trainer.model.parameters()]
    loss = trainer.step(2)
    assert 0 < loss < 10
    assert any(not torch.equal(a, p) for a, p in zip(before, trainer.model.parameters(), strict=True))
    docs = polyglu_mfu.packed_documents(3, 4096, torch.Generator().manual_seed(0))
    assert docs.shape == (3, 4096) and (docs[:, 0] == 0).all()
    assert ((docs[:, 1:] - docs[:, :-1]) >= 0).all() and int(docs.max()) >= 2  # several documents a row, in order
    six_n, with_attention = polyglu_mfu.flops_per_token(cfg.model, 1000, 64)
    assert six_n == 6000 and with_attention == 6000 + 12 * 2 * 4 * 8 * 64


def test_the_moe_measurement_runs_its_gpu_variants(monkeypatch):
    monkeypatch.setattr(moe_layer, "D_MODEL", 64)
    monkeypatch.setattr(moe_layer, "D_FF", 128)
    result = moe_layer.measure(tokens=32, reps=1, warmup=0, precision="bf16", with_sorted=True)
    for key in ("time_vs_dense_top1", "time_vs_dense_top2", "speedup_vs_loop_top1", "speedup_vs_sorted_top1",
                "speedup_vs_sorted_top2"):
        assert result[key] > 0, key


def test_the_summary_judges_each_claim_by_its_scripts_own_target():
    stated = {"polyglu_600m_mfu": polyglu_mfu.TARGET["mfu"],
              "moe_time_vs_dense_top1": moe_layer.GPU_TARGETS["time_vs_dense_top1"],
              "moe_time_vs_dense_top2": moe_layer.GPU_TARGETS["time_vs_dense_top2"],
              "trainer_overhead_ratio": trainer_overhead.TARGET}
    assert set(stated) == set(summarize.CLAIMS)
    for claim, (_part, _key, op, target) in summarize.CLAIMS.items():
        want_op, want = stated[claim].split()
        assert (op, target) == (want_op, float(want)), claim


def test_summary_verdicts(tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "polyglu_mfu.log").write_text('noise\n{"mfu": 0.43}\ntraceback text\n')
    (logs / "moe_layer.log").write_text('{"time_vs_dense_top1": 1.05, "time_vs_dense_top2": 2.3}\n')
    # trainer_overhead wrote no JSON (it failed): its claim is unknown, so not all claims are met.
    summary = summarize.summarize(tmp_path, dry_run=False, wall_s=12.0)
    claims = summary["claims"]
    assert claims["polyglu_600m_mfu"] == {"value": 0.43, "target": ">= 0.4", "met": True}
    assert claims["moe_time_vs_dense_top1"]["met"] is True and claims["moe_time_vs_dense_top2"]["met"] is False
    assert claims["trainer_overhead_ratio"]["met"] is None and summary["all_claims_met"] is False
    (tmp_path / "pytest-cuda.xml").write_text(
        '<testsuites><testsuite tests="3" failures="1" errors="0" skipped="0">'
        '<testcase classname="tests.test_cuda" name="a"/><testcase classname="tests.test_cuda" name="b">'
        '<failure message="x"/></testcase><testcase classname="tests.test_cuda" name="c"/></testsuite></testsuites>')
    summary = summarize.summarize(tmp_path, dry_run=False, wall_s=12.0)
    assert summary["cuda_tests"]["passed"] == 2 and summary["cuda_tests"]["failed"] == ["tests.test_cuda::b"]
    assert summary["all_tests_passed"] is False


def test_steps_past_the_time_budget_are_skipped_and_recorded(tmp_path):
    out = tmp_path / "gpu"
    proc = subprocess.run(["bash", str(GPU / "run.sh"), "--dry-run", "--budget-s", "5", "--out", str(out)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "gpu_check.json").read_text())
    steps = ("env", "tests", "polyglu_mfu", "moe_layer", "trainer_overhead")
    assert summary["exit_codes"] == dict.fromkeys(steps, "skipped")
    assert re.search(r"skipped, [0-5] s left of the 5 s budget", proc.stdout)
