"""The house: its layering contracts hold and catch a breach, every config key has one default, and a new model
family is one folder, one registry line and one YAML file (tests/toy_family/ trains through trainer/run.py)."""

from __future__ import annotations

import ast
import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from data.config import DataConfig, DomainConfig
from models.registry import config_schema
from tests.conftest import ROOT, RUN, assert_ok, clean_env, tiny_args
from trainer.config.schema import Config, HardwareConfig

PACKAGES = ("trainer", "models", "data", "eval")
LAYERS = "Layers: eval > trainer > models | data (which use only trainer.base)"


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    lint = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))
    return subprocess.run([lint, "--no-cache"], cwd=root, capture_output=True, text=True, timeout=300,
                          env=clean_env(PYTHONPATH=str(root)))


def test_the_layering_contracts_hold():
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "BROKEN" not in result.stdout and result.stdout.count("KEPT") == 3


@pytest.mark.parametrize("module, breach, contract", [
    ("models/moe/stats.py", "import trainer.loop", LAYERS),
    ("data/config.py", "import models.registry", LAYERS),
    ("trainer/loop.py", "import eval.generate", LAYERS),
    ("trainer/base/errors.py", "import trainer.config.schema", "trainer.base imports nothing above it"),
    ("models/moe/stats.py", "import models.moe.model", "No import cycles inside a package"),
])
def test_the_contracts_catch_a_breach(tmp_path, module, breach, contract):
    """On a copy of the packages with one forbidden import added, lint-imports fails and names the contract."""
    for package in PACKAGES:
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    with open(tmp_path / module, "a") as handle:
        handle.write(f"\n{breach}  # noqa\n")
    result = lint_imports(tmp_path)
    assert result.returncode != 0
    report = " ".join(result.stdout.split())  # lint-imports wraps long contract names
    assert f"{contract} BROKEN" in report, result.stdout[-3000:]


# ----------------------------------------------------------------------------------------------- one default


NO_DEFAULT = object()


def _schema_default(schema: type, path: list[str]):
    """The schema's default for a dotted path inside `schema` (data.domains.<name>.* reads DomainConfig)."""
    node: object = schema
    parts = list(path)
    while parts:
        part = parts.pop(0)
        if node is DataConfig and part == "domains":
            if not parts:
                return {}
            parts.pop(0)  # the domain's own name
            node = DomainConfig
            continue
        if not dataclasses.is_dataclass(node):
            return NO_DEFAULT  # an entry of a free-form mapping (a domain's filter): the user's, not the schema's
        spec = {f.name: f for f in dataclasses.fields(node)}[part]
        default = spec.default_factory() if spec.default_factory is not dataclasses.MISSING else spec.default
        node = type(default) if dataclasses.is_dataclass(default) else default
    return node


def _leaves(node, prefix: tuple[str, ...] = ()):
    if isinstance(node, dict) and node:
        for key, value in node.items():
            yield from _leaves(value, (*prefix, str(key)))
    else:
        yield prefix, node


def _restated(path: Path, schema: type) -> list[str]:
    """The keys a YAML file sets to the value the schema already defaults them to."""
    raw = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    raw = {k: v for k, v in raw.items() if k not in ("defaults", "hydra")}
    found = []
    for keys, value in _leaves(raw):
        if not keys:
            continue
        default = _schema_default(schema, list(keys))
        if value == default and not (isinstance(default, dict) and value == {}):
            found.append(f"{path.name}: {'.'.join(keys)}={value!r} restates the schema default")
    return found


def test_every_key_has_one_default():
    """Defaults live in the typed schema (trainer/config/schema.py, data/config.py, models/<family>/config.py). The
    root config and the model entries set no key at all, so a family's defaults cannot disagree with its
    dataclass; data, hardware and task entries only choose values that differ from the schema's. Presets are
    experiments and pin every value they depend on."""
    conf = ROOT / "conf"
    problems = []
    for path in [conf / "config.yaml", *sorted((conf / "model").glob("*.yaml"))]:
        raw = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
        extra = sorted(set(raw) - {"defaults", "hydra"})
        problems += [f"{path.relative_to(ROOT)} sets {extra}: a default belongs in the schema"] if extra else []
    for path in sorted((conf / "data").glob("*.yaml")):
        problems += _restated(path, DataConfig)
    for path in sorted((conf / "hardware").glob("*.yaml")):
        problems += _restated(path, HardwareConfig)
    for path in sorted((conf / "task").glob("*.yaml")):
        problems += _restated(path, Config)
    assert not problems, "\n".join(problems)
    assert sorted(p.name for p in conf.iterdir() if p.is_dir()) == [
        "data", "hardware", "model", "preset", "preset_model", "task"]


def test_one_default_test_notices_a_restated_default(tmp_path):
    restating = tmp_path / "hw.yaml"
    restating.write_text("name: gpu\nprecision: fp32\ndeepspeed: {zero_stage: 2}\n")
    assert _restated(restating, HardwareConfig) == [
        "hw.yaml: precision='fp32' restates the schema default",
        "hw.yaml: deepspeed.zero_stage=2 restates the schema default"]
    assert _schema_default(config_schema("moe"), ["topk"]) == 1


# ----------------------------------------------------------------------------------------------- a new family


def launch_with_toy_family(tmp_path: Path, args: list[str], script: str | None = None) -> subprocess.CompletedProcess:
    """trainer/run.py as a user runs it (or `script`), after one registry line for the toy family (as a plugin
    would add it)."""
    launcher = tmp_path / "launch_toy.py"
    launcher.write_text(
        "import runpy, sys\n"
        f"sys.path[:0] = [{str(ROOT)!r}]\n"
        "from models.registry import register_family\n"
        "register_family('toy', 'tests.toy_family')\n"
        + (script or f"sys.argv = [{RUN!r}, *sys.argv[1:]]\nrunpy.run_path({RUN!r}, run_name='__main__')\n"))
    search = f"hydra.searchpath=[file://{ROOT / 'tests' / 'toy_family' / 'conf'}]"
    return subprocess.run([sys.executable, str(launcher), search, *args], cwd=tmp_path, env=clean_env(),
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_a_new_family_trains_through_the_entrypoint(tmp_path, data_cache):
    args = tiny_args(tmp_path, data_cache, "model=toy", "train.max_steps=4", "train.eval_every=2",
                     "checkpoint.save_every=2", "train.log_router_every=2", model_sizes=[])
    result = launch_with_toy_family(tmp_path, args)
    assert_ok(result)
    run_dir = tmp_path / "run"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "router/gate_share/1" in r] == [2, 4]
    last_eval = [r for r in rows if "eval/loss" in r][-1]
    assert {f"eval/{d}/router/gate_share/0" for d in ("code", "math", "prose")} <= set(last_eval)
    report = json.loads((run_dir / "toy_gate_report.json").read_text())  # the family's callback ran at the end
    assert sorted(report) == ["code", "math", "prose"] and all(sum(v) == pytest.approx(1.0) for v in report.values())
    sidecar = json.loads((run_dir / "final-model.json").read_text())
    assert sidecar["mode"] == "toy" and sidecar["architecture"]["d_model"] == 16
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"
    # eval's tools take it too: lm-eval's loglikelihood through the harness adapter (models/inference.py).
    scored = launch_with_toy_family(tmp_path, [], script=(
        "from lm_eval.api.instance import Instance\n"
        "from eval.harness.adapter import RoutedLM\n"
        f"lm = RoutedLM({str(run_dir)!r}, device='cpu')\n"
        "print(lm.loglikelihood([Instance('loglikelihood', {}, ('x = ', '1'), 0)], disable_tqdm=True))\n"))
    assert_ok(scored)
    (logprob, _), = ast.literal_eval(scored.stdout.strip().splitlines()[-1])  # a list of (float, bool)
    assert logprob < 0

    # Its own keys and rules are checked like any family's, in one line.
    typo = launch_with_toy_family(tmp_path, [*args, "run.name=typo", "model.d_modle=8"])
    assert typo.returncode == 2 and "did you mean 'd_model'" in typo.stderr.strip().splitlines()[-1]
    bad = launch_with_toy_family(tmp_path, [*args, "run.name=bad", "model.d_model=0"])
    assert bad.returncode == 2 and "model.d_model=0 is impossible" in bad.stderr
    assert not (tmp_path / "typo").exists() and not (tmp_path / "bad").exists()
