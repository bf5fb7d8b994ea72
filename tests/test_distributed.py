"""DDP and DeepSpeed ZeRO-2 with 2 processes on CPU (gloo on loopback), launched by torchrun as a user would.

Two processes with micro-batch 1 read exactly the blocks one process reads with micro-batch 2 (the
stream shards one shared cursor), and gradient averaging makes the updates the same: so the trained
weights must match a single-process run, which pins both the data sharding and the gradient reduction.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import ROOT, assert_ok, clean_env, free_port, start_tiny_run, tiny_run
from tests.test_stop_signals import wait_for_training
from tests.test_train_e2e import assert_same_weights

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

STEPS = ["train.max_steps=4", "train.eval_every=2", "checkpoint.save_every=2", "optim.learning_rate=1e-3"]


def torchrun(nproc: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
            f"--master_port={free_port()}", "--master_addr=127.0.0.1"]


def assert_close_weights(a, b, atol=1e-5) -> None:
    wa, wb = load_file(str(a)), load_file(str(b))
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wa[name].float(), wb[name].float(), atol=atol, rtol=1e-4, msg=name)


@pytest.fixture(scope="module")
def single_reference(tmp_path_factory, data_cache):
    tmp = tmp_path_factory.mktemp("single")
    assert_ok(tiny_run(tmp, data_cache, *STEPS, "train.batch_size=2", name="single"))
    return tmp / "single"


def test_ddp_two_processes_match_one_process(tmp_path, data_cache, single_reference):
    result = tiny_run(tmp_path, data_cache, *STEPS, "train.batch_size=1", name="ddp", launcher=torchrun())
    assert_ok(result)
    run_dir = tmp_path / "ddp"
    assert result.stdout.count("run directory:") == 1, "one closing report, not one per process"
    assert (tmp_path / "ddp" / "run.log").read_text().count("] - data: ") == 1, "one log, not one per process"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["engine"], summary["world_size"], summary["status"]) == ("ddp", 2, "completed")
    assert summary["tokens_seen"] == json.loads((single_reference / "summary.json").read_text())["tokens_seen"]
    assert_close_weights(run_dir / "final-model.safetensors", single_reference / "final-model.safetensors")
    ckpt = torch.load(run_dir / "ckpt-step-4.pt", map_location="cpu", weights_only=True)
    assert ckpt["data_state"]["world_size"] == 2

    # Resume under DDP from the step-2 checkpoint reaches the same weights.
    (run_dir / "ckpt-step-4.pt").unlink()
    resumed = tiny_run(tmp_path, data_cache, *STEPS, "train.batch_size=1", "run.resume=auto", name="ddp",
                       launcher=torchrun())
    assert_ok(resumed)
    assert json.loads((run_dir / "summary.json").read_text())["resumed_from"].endswith("ckpt-step-2.pt")
    assert_close_weights(run_dir / "final-model.safetensors", single_reference / "final-model.safetensors")


def test_deepspeed_zero2_two_processes_train_save_and_resume(tmp_path, data_cache, single_reference):
    ds = ["hardware=a100_zero2", "hardware.device=cpu", "hardware.precision=fp32", "train.batch_size=1"]
    result = tiny_run(tmp_path, data_cache, *STEPS, *ds, name="zero2", launcher=torchrun())
    assert_ok(result)
    run_dir = tmp_path / "zero2"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["engine"], summary["world_size"], summary["status"]) == ("deepspeed", 2, "completed")
    assert (run_dir / "ckpt-step-4.deepspeed").is_dir() and (run_dir / "ckpt-step-4.pt").is_file()
    assert not list(run_dir.glob("*.tmp")), "the DeepSpeed directory is renamed into place whole"
    # Same optimizer, same schedule, same data: ZeRO-2 in fp32 must train what one process trains.
    assert_close_weights(run_dir / "final-model.safetensors", single_reference / "final-model.safetensors",
                         atol=1e-4)

    (run_dir / "ckpt-step-4.pt").unlink()
    resumed = tiny_run(tmp_path, data_cache, *STEPS, *ds, "run.resume=auto", name="zero2", launcher=torchrun())
    assert_ok(resumed)
    assert json.loads((run_dir / "summary.json").read_text())["resumed_from"].endswith("ckpt-step-2.pt")
    assert_close_weights(run_dir / "final-model.safetensors", single_reference / "final-model.safetensors",
                         atol=1e-4)

    # ZeRO's optimizer state is partitioned for 2 processes: one process cannot load it, and says so in one line.
    refused = tiny_run(tmp_path, data_cache, *STEPS, *ds, f"run.resume={run_dir / 'ckpt-step-2.pt'}", name="zero1")
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert "Traceback" not in refused.stderr and "--nproc_per_node=2" in refused.stderr.splitlines()[-1]
    # Nor can ZeRO-0 (plain data parallel) read ZeRO's partitions, whatever the world size.
    refused = tiny_run(tmp_path, data_cache, *STEPS, *ds, "hardware.deepspeed.zero_stage=0",
                       f"run.resume={run_dir / 'ckpt-step-2.pt'}", name="zero1")
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert "Traceback" not in refused.stderr and "zero_stage=2" in refused.stderr.splitlines()[-1]


def test_ddp_trains_the_moe_family_like_one_process(tmp_path, data_cache):
    """Experts that get no tokens on a rank still take part in the reduction. Noise off and lb_coef 0:
    the load-balancing loss is a product of per-rank statistics, so it is the one term DDP does not
    average into the single-process value; everything else must match."""
    moe = ["model=moe", "model.moe_layers=[1]", "model.num_experts=4", "model.noise_std=0", "model.lb_coef=0",
           "train.log_router_every=1"]
    assert_ok(tiny_run(tmp_path, data_cache, *STEPS, *moe, "train.batch_size=2", name="single"))
    assert_ok(tiny_run(tmp_path, data_cache, *STEPS, *moe, "train.batch_size=1", name="ddp", launcher=torchrun()))
    assert json.loads((tmp_path / "ddp" / "summary.json").read_text())["engine"] == "ddp"
    assert_close_weights(tmp_path / "ddp" / "final-model.safetensors", tmp_path / "single" / "final-model.safetensors")
    # Routing statistics are global, not one process's view: the collapse detector judges them on every
    # rank, and ranks judging different numbers would stop at different steps and hang the run.
    def fractions(run: str) -> list[dict]:
        rows = [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if "/fraction/" in k} for r in rows if "train/loss" in r]

    single, ddp = fractions("single"), fractions("ddp")
    assert single and all(single) and len(single) == len(ddp)
    for a, b in zip(single, ddp, strict=True):
        assert a.keys() == b.keys() and all(abs(a[k] - b[k]) < 1e-6 for k in a), (a, b)


def test_ddp_with_dropout_resumes_bit_identically(tmp_path, data_cache):
    """Each process draws its own dropout masks and its own RNG state is checkpointed and restored."""
    args = [*STEPS, "model.dropout=0.2", "train.batch_size=1"]
    assert_ok(tiny_run(tmp_path, data_cache, *args, name="whole", launcher=torchrun()))
    whole = tmp_path / "whole"
    ckpt = torch.load(whole / "ckpt-step-2.pt", map_location="cpu", weights_only=True)
    by_rank = ckpt["rng_states_by_rank"]
    assert len(by_rank) == 2 and not torch.equal(by_rank[0]["torch_rng_state"], by_rank[1]["torch_rng_state"])
    assert_ok(tiny_run(tmp_path, data_cache, *args, f"run.resume={whole / 'ckpt-step-2.pt'}", name="resumed",
                       launcher=torchrun()))
    assert_same_weights(tmp_path / "resumed" / "final-model.safetensors", whole / "final-model.safetensors")


def test_deepspeed_trains_the_moe_family(tmp_path, data_cache):
    moe = ["model=moe", "model.moe_layers=[1]", "model.num_experts=4"]
    ds = ["hardware=a100_zero2", "hardware.device=cpu", "hardware.precision=fp32", "train.batch_size=1"]
    assert_ok(tiny_run(tmp_path, data_cache, *STEPS, *moe, *ds, name="zero2moe", launcher=torchrun()))
    run_dir = tmp_path / "zero2moe"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["engine"], summary["mode"], summary["status"]) == ("deepspeed", "moe", "completed")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all("train/lb_loss" in r for r in rows if "train/loss" in r)
    assert (run_dir / "figures" / "expert_usage.png").is_file()


MIX = ["data.mix=[{at: 0.0, weights: {code: 0.6, math: 0.2, prose: 0.2}}, "
       "{at: 1.0, weights: {code: 0.1, math: 0.8, prose: 0.1}}]"]


def test_ddp_with_a_mix_schedule_reads_the_global_mix_of_one_process(tmp_path, data_cache):
    """Ranks slice one shared window of the scheduled mix: two processes train what one process trains."""
    assert_ok(tiny_run(tmp_path, data_cache, *STEPS, *MIX, "train.batch_size=2", name="single-mix"))
    assert_ok(tiny_run(tmp_path, data_cache, *STEPS, *MIX, "train.batch_size=1", name="ddp-mix", launcher=torchrun()))
    assert_close_weights(tmp_path / "ddp-mix" / "final-model.safetensors",
                         tmp_path / "single-mix" / "final-model.safetensors")

    def shares(run: str) -> list[dict]:
        rows = [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if k.startswith("data/")} for r in rows if "data/code/fraction" in r]

    assert shares("ddp-mix") == shares("single-mix") and len(shares("single-mix")) == 4
    ckpt = torch.load(tmp_path / "ddp-mix" / "ckpt-step-4.pt", map_location="cpu", weights_only=True)
    assert ckpt["data_state"]["kind"] == "mixed" and sum(ckpt["data_state"]["cursor"].values()) == 4 * 2 * 2


TEARDOWN_PROBE = """
import json, torch, torch.distributed as dist
from deepspeed.utils import groups
from trainer.engines.deepspeed import DeepSpeedEngine
from trainer.config.schema import HardwareConfig, TrainConfig
engine = DeepSpeedEngine(HardwareConfig(device="cpu", engine="deepspeed"))
model = torch.nn.Linear(4, 4)
optimizer = torch.optim.AdamW(model.parameters())
engine.setup(model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0),
             TrainConfig(batch_size=1, grad_accum_steps=1))
state = lambda: {"deepspeed_world_group": groups._WORLD_GROUP is not None, "torch_initialized": dist.is_initialized()}
before = state()
engine.close()
print(json.dumps({"before": before, "after": state()}))
"""


def test_deepspeed_close_releases_the_process_groups_deepspeed_holds():
    """torch's destroy_process_group alone leaves DeepSpeed's module-global groups (and their gloo threads)
    to be destroyed during interpreter shutdown; close() must hand them back while Python is alive."""
    result = subprocess.run([sys.executable, "-c", TEARDOWN_PROBE], cwd=ROOT, env=clean_env(), capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["before"] == {"deepspeed_world_group": True, "torch_initialized": True}
    assert report["after"] == {"deepspeed_world_group": False, "torch_initialized": False}


def worker_pid(launcher_pid: int, rank: int) -> int | None:
    """The torchrun worker of `rank`: a child of the launcher whose environment says RANK=<rank>."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            environ = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if parent == launcher_pid and f"RANK={rank}".encode() in environ:
            return int(entry.name)
    return None


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds torchrun's workers through /proc")
def test_ddp_stops_every_process_at_the_same_update_when_one_is_signalled(tmp_path, data_cache):
    """Only rank 1 gets SIGTERM. Rank 0 must learn of it at the same update, or the save below would hang on
    a collective one rank never joins."""
    args = ["train.max_steps=40", "train.eval_every=10", "checkpoint.save_every=1000", "train.log_every=1",
            "train.batch_size=1"]
    run_dir = tmp_path / "ddp-stop"
    process = start_tiny_run(tmp_path, data_cache, *args, name="ddp-stop", launcher=torchrun())
    wait_for_training(run_dir, process)
    rank1 = worker_pid(process.pid, rank=1)
    assert rank1 is not None
    os.kill(rank1, signal.SIGTERM)
    try:
        stdout, stderr = process.communicate(timeout=180)
    finally:  # a hang (ranks disagreeing about the stop) must not outlive the test
        if process.poll() is None:
            process.kill()
            subprocess.run(["pkill", "-KILL", "-f", str(run_dir)], check=False)

    assert process.returncode != 0  # torchrun reports the workers' 143 as a failure: the run is unfinished
    summary = json.loads((run_dir / "summary.json").read_text())
    stopped_at = summary["final_step"]
    assert summary["status"] == "interrupted" and stopped_at < 40, (summary, stderr[-3000:])
    assert summary["stop_reason"].startswith(f"a stop signal sent to another process at step {stopped_at}")
    checkpoint = torch.load(run_dir / f"ckpt-step-{stopped_at}.pt", map_location="cpu", weights_only=True)
    assert len(checkpoint["rng_states_by_rank"]) == 2  # both processes took part in the save

    assert_ok(tiny_run(tmp_path, data_cache, *args, "run.resume=auto", name="ddp-stop", launcher=torchrun()))
    resumed = json.loads((run_dir / "summary.json").read_text())
    assert (resumed["status"], resumed["final_step"]) == ("completed", 40)


def test_nccl_on_a_cpu_run_is_refused_in_one_line_before_any_process_group():
    from trainer.base.errors import UserError
    from trainer.config.schema import HardwareConfig
    from trainer.engines.distributed import backend_for

    cpu = torch.device("cpu")
    assert backend_for(HardwareConfig(dist_backend="auto"), cpu) == "gloo"
    assert backend_for(HardwareConfig(dist_backend="gloo"), cpu) == "gloo"
    with pytest.raises(UserError, match="hardware.dist_backend=nccl .* use hardware.dist_backend=gloo or auto"):
        backend_for(HardwareConfig(dist_backend="nccl"), cpu)


@pytest.mark.skipif(torch.cuda.is_available() or torch.backends.mps.is_available(), reason="needs a CPU-only machine")
def test_a_device_this_machine_lacks_is_refused_with_what_to_use():
    from trainer.base.errors import UserError
    from trainer.config.schema import HardwareConfig
    from trainer.engines.base import resolve_device

    assert resolve_device(HardwareConfig(name="cpu", device="auto")) == torch.device("cpu")
    for hardware, device, way_out in (("cuda", "cuda", "use hardware=cpu, or hardware.device=auto"),
                                      ("mps", "mps", "use hardware=cpu, or hardware.device=auto"),
                                      # hardware=cpu with a device override: change the override
                                      ("cpu", "cuda", "use hardware.device=auto or cpu")):
        with pytest.raises(UserError, match=f"hardware.device={device} \\(hardware={hardware}\\) .*{way_out}"):
            resolve_device(HardwareConfig(name=hardware, device=device))
