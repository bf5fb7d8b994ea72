"""Every config composes; user mistakes stop the run with one line; --cfg job stays torch-free."""

from __future__ import annotations

import itertools
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, assert_ok, compose_validated, run_cli
from trainer.base.errors import UserError
from trainer.config.explain import explain
from trainer.config.validate import validate

CONF = ROOT / "conf"


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def test_the_groups_the_design_promises_exist():
    assert {"dense", "moe", "polyglu"} <= set(options("model"))
    assert {"cpu", "mps", "cuda", "a100_zero2"} <= set(options("hardware"))
    assert {"quickstart", "shakedown", "dense", "moe-main", "no-lb", "top2", "polyglu-shakedown",
            "polyglu-pretrain"} <= set(options("preset"))
    assert {"embedded", "mixed3", "polyglu-mix", "local"} <= set(options("data"))


def pinned_family(preset: str) -> str | None:
    """The model family a preset selects itself (`override /model: X`), if any."""
    match = re.search(r"override /model:\s*(\S+)", (CONF / "preset" / f"{preset}.yaml").read_text())
    return match.group(1) if match else None


# What a data entry cannot know by itself: the user's own files.
DATA_NEEDS = {"local": ["data.domains.text.paths=[corpus/*.jsonl]"],
              "sft-local": ["data.domains.chat.paths=[corpus/*.jsonl]"]}


# Hardware entries set hardware.* alone, so they meet every preset (with its own model and data) rather than every
# preset x model x data as well: the whole product grew past 900 compositions, minutes of the suite.
COMBINATIONS = [*((preset, "cpu", model, data) for preset, model, data in itertools.product(
    options("preset"), options("model"), options("data"))),
    *((preset, hardware, None, None) for preset, hardware in itertools.product(
        options("preset"), [h for h in options("hardware") if h != "cpu"]))]


@pytest.mark.parametrize("preset,hardware,model,data", COMBINATIONS)
def test_every_combination_composes_and_validates(preset, hardware, model, data):
    if model is None:  # the preset's own model and data
        cfg = compose_validated([f"preset={preset}", f"hardware={hardware}"])
        assert (cfg.run.preset, cfg.hardware.name) == (preset, hardware)
        return
    overrides = [f"preset={preset}", f"hardware={hardware}", f"model={model}", f"data={data}",
                 *DATA_NEEDS.get(data, [])]
    pinned = pinned_family(preset)
    sets_model_keys = "model" in yaml.safe_load((CONF / "preset" / f"{preset}.yaml").read_text())
    if pinned is not None and pinned != model and sets_model_keys:
        # A preset that sets family-specific keys cannot take another family: one clear line, no traceback.
        with pytest.raises(Exception) as err:
            compose_validated(overrides)
        message = explain(err.value)
        assert message is not None and f"conf/preset/{preset}.yaml sets 'model." in message
        return
    cfg = compose_validated(overrides)
    assert cfg.run.preset == preset
    assert cfg.hardware.name == hardware
    assert cfg.model.family == model
    assert cfg.data.domains, "every data entry names its domains"


def test_every_preset_model_overlay_names_a_preset_and_a_family_and_applies():
    """conf/preset_model/<preset>/<family>.yaml: a typo in either name would silently never apply."""
    overlays = sorted((CONF / "preset_model").glob("*/*.yaml"))
    assert overlays
    for overlay in overlays:
        preset, family = overlay.parent.name, overlay.stem
        assert preset in options("preset") and family in options("model"), overlay
        cfg = compose_validated([f"preset={preset}", f"model={family}"])
        for key, value in yaml.safe_load(overlay.read_text()).items():
            assert getattr(cfg.model, key) == value, (overlay, key)


def test_preset_sft_sets_each_familys_own_keys_and_the_command_line_still_wins():
    assert compose_validated(["preset=sft", "model=polyglu"]).model.tau_frozen == 0.1
    assert compose_validated(["preset=sft", "model=moe"]).model.document_masking is True
    assert compose_validated(["preset=sft"]).model.document_masking is True
    assert compose_validated(["model=dense"]).model.document_masking is False  # the seed's default elsewhere
    assert compose_validated(["preset=sft", "model=polyglu", "model.tau_frozen=0.2"]).model.tau_frozen == 0.2


@pytest.mark.parametrize("preset", options("preset"))
def test_every_preset_composes_with_its_own_model(preset):
    cfg = compose_validated([f"preset={preset}"])
    assert cfg.model.family == (pinned_family(preset) or "dense")


def test_defaults_are_the_seed_contract():
    """With the seed's dense preset, every seed train.py argument has the seed's default."""
    cfg = compose_validated(["preset=dense"])
    assert (cfg.run.output_dir, cfg.run.seed, cfg.run.resume, cfg.hardware.device) == ("outputs", 42, None, "cpu")
    assert (cfg.data.size_mb, cfg.data.block_size, cfg.data.balance_tokens) == (10.0, 512, True)
    assert (cfg.train.batch_size, cfg.train.grad_accum_steps, cfg.train.max_steps) == (2, 4, 5000)
    assert (cfg.train.eval_every, cfg.checkpoint.save_every, cfg.checkpoint.keep_last_k) == (200, 500, 3)
    assert (cfg.optim.learning_rate, cfg.optim.weight_decay, cfg.optim.warmup_fraction) == (5e-5, 0.01, 0.1)
    assert (cfg.train.max_grad_norm, cfg.train.log_router_every) == (1.0, 100)
    assert (cfg.tracking.wandb_project, cfg.tracking.wandb_entity) == ("moe-emergence", None)
    assert cfg.run.name == "dense"


def test_shakedown_preset_has_the_seed_values():
    cfg = compose_validated(["preset=shakedown"])
    seed_values = (cfg.train.max_steps, cfg.data.size_mb, cfg.train.eval_every, cfg.checkpoint.save_every)
    assert seed_values == (100, 1.0, 50, 50)
    assert cfg.data.balance_tokens is False


def test_the_shakedown_gate_of_each_family_gets_its_own_run_directory():
    """`preset=shakedown` then `preset=shakedown model=moe` (the README's order) must not share a directory:
    the second would find the first's checkpoints and refuse to start."""
    names = {family: compose_validated(["preset=shakedown", f"model={family}"]).run.name
             for family in ("dense", "moe", "polyglu")}
    assert names == {"dense": "shakedown-dense", "moe": "shakedown-moe", "polyglu": "shakedown-polyglu"}
    assert compose_validated(["preset=shakedown", "run.name=gate"]).run.name == "gate"


def test_auto_device_is_accepted_and_hardware_group_sets_engine():
    cfg = compose_validated(["hardware=a100_zero2", "hardware.device=auto"])
    assert cfg.hardware.engine == "deepspeed" and cfg.hardware.precision == "bf16"


@pytest.mark.parametrize("override,needle", [
    (["optim.learning_rate=-1"], "optim.learning_rate=-1.0"),
    (["data.block_size=0"], "data.block_size=0"),
    (["hardware.device=tpu"], "hardware.device='tpu'"),
    (["model.n_embd=100", "model.n_head=3"], "model.n_embd=100"),
    (["data.block_size=2048"], "model.n_positions"),
    (["+train.bogus=1"], "train.bogus"),
    (["hardware=a100_zero2", "hardware.deepspeed.zero_stage=3"], "stage 3 is not supported"),
    (["data=local"], "data.domains.text.paths is empty"),
    (["data.format=shards"], "data.tokenizer.name='bpe'"),
    (["task=tokenize"], "data.tokenizer.name='bpe'"),
    (["data=polyglu-mix", "data.domains.math.max_tokens=0"], "data.domains.math.max_tokens=0"),
    (["data=polyglu-mix", "data.mix=[{at: 0.5, weights: {math: 1, stem: 1, code: 1}}]"], "data.mix[0].at=0.5"),
    (["data=polyglu-mix", "data.mix=[{at: 0.0, weights: {math: 1, stem: 1}}]"], "'code' differs"),
    (["data=polyglu-mix", "data.mix=[{at: 0.0, weights: {math: 1, stem: 1, code: 1}}, "
      "{at: 0.0, weights: {math: 1, stem: 1, code: 1}}]"], "must be greater than data.mix[0].at"),
    (["data=polyglu-mix", "data.mix=[{at: 0.0, weights: {math: -1, stem: 1, code: 1}}]"], ">= 0 with a positive"),
    (["data.shard_tokens=0"], "data.shard_tokens=0"),
    (["checkpoint.keep_last_snapshots=0"], "null (keep all) or an integer >= 1"),
    # polyglu-pretrain shortened for a smoke run keeps its 2000 warmup steps: it would never reach its lr.
    (["preset=polyglu-pretrain", "data=embedded", "train.max_steps=100"],
     "optim.warmup_steps=2000 is not below train.max_steps=100"),
    # Collapse thresholds that even routing already exceeds, or no expert can exceed.
    (["preset=no-lb", "model.collapse_threshold=0.1"], "0.125 at even routing (topk 1 of 8 experts)"),
    (["preset=top2", "model.collapse_stop=true", "model.collapse_threshold=0.2"], "such as 0.62"),
    (["preset=no-lb", "model.collapse_threshold=1.0"], "model.collapse_threshold=1.0 can never"),
    # No threshold works when every expert takes every token: say what does, not "such as 1" (itself refused).
    (["preset=no-lb", "model.topk=2", "model.num_experts=2"], "set model.collapse_stop=false, or lower model.topk"),
])
def test_validation_rejects_with_one_line(override, needle):
    with pytest.raises(UserError) as err:
        compose_validated(override)
    assert needle in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("args,needles", [
    (["train.max_step=5"], ["train.max_step", "did you mean 'max_steps'"]),
    (["train.batch_size=abc"], ["train.batch_size", "abc", "expected an integer, for example train.batch_size="]),
    (["data=local", "data.domains.text.filter.language=Python"],
     ["data.domains.text.filter has no entry 'language' yet; add one with a leading +: "
      "+data.domains.text.filter.language=<value>"]),
    (["optim.lr=1e-3"], ["'optim.lr': did you mean 'learning_rate'?"]),
    (["model=polyglu", "model.n_layer=2"], ["not to the selected polyglu (did you mean model.n_layers?)"]),
    (["model=moe", "model.moe_layers=8"], ["expected a list, for example model.moe_layers=[8,9,10,11]"]),
    (["model=moe", "model.collapse_stop=maybe"], ["expected true or false, for example model.collapse_stop=false"]),
    (["checkpoint.keep_last_snapshots=all"], ["expected an integer or null"]),
    (["optim.learning_rate=-0.1"], ["optim.learning_rate=-0.1", "positive"]),
    (["data.block_size=0"], ["data.block_size=0", ">= 8"]),
    (["hardware.device=tpu"], ["hardware.device='tpu'", "auto, cpu, cuda, mps"]),
    (["preset=nope"], ["preset=nope", "available:", "shakedown"]),
    (["model.n_layr=3"], ["model.n_layr", "did you mean 'n_layer'"]),
    (["preset=moe-main", "model=dense"], ["conf/preset/moe-main.yaml sets 'model.", "drop that override"]),
    (["model.topk=2"], ["'model.topk' belongs to model family moe", "add model=moe"]),
    (["--multirun", "preset=no-lb,top2", "model.collapse_check_every=50"], ["add model=moe"]),
    (["model=moe", "model.moe_layers=[8,12]"], ["model.moe_layers=[8, 12] names block 12", "n_layer=12"]),
    (["data=local", "data.domains.text.paths=[a.jsonl]", "+data.domains.math.paths=[b.jsonl]"],
     ["data.domains.math: a new domain cannot be added on the command line", "conf/data/local.yaml"]),
    (["task=tokenise"], ["task=tokenise", "available:", "tokenize"]),
    (["data=local", "data.domains.txt.paths=[a.jsonl]"], ["did you mean 'text'?", "a new domain goes in a data entry"]),
    (["data=local", "data.domains.text.path=[a.jsonl]"], ["'data.domains.text.path': did you mean 'paths'?"]),
    (["data=local"], ["data.domains.text.paths is empty; data.source=local needs files per domain"]),
])
def test_cli_user_errors_are_one_line_and_exit_2(tmp_path, args, needles):
    flags = [a for a in args if a.startswith("--")]
    result = run_cli([*flags, f"run.output_dir={tmp_path}", *(a for a in args if not a.startswith("--"))],
                     cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    for needle in needles:
        assert needle in lines[0]
    assert "Traceback" not in result.stderr
    assert not list(Path(tmp_path).rglob("*.pt")), "nothing may run before validation"
    if not flags:  # a sweep keeps its failed job's directory, with the job's overrides in it
        assert not list(Path(tmp_path).iterdir()), "a refused run leaves no run directory behind"


def readme_recipe() -> tuple[str, str]:
    """(path, text) of the multi-domain data entry README.md prints under "Your own files", exactly as printed."""
    section = (ROOT / "README.md").read_text().split("**Your own files.**", 1)[1]
    text = re.search(r"```yaml\n(.*?)```", section, re.S).group(1)
    first = text.splitlines()[0]
    assert first.startswith("# ") and first.endswith(".yaml") and "defaults: [local, _self_]" in text
    return first[2:].strip(), text


def local_yaml_recipe() -> str:
    """The data entry conf/data/local.yaml's comment prints, uncommented."""
    lines = (CONF / "data" / "local.yaml").read_text().splitlines()
    start = lines.index("#   defaults: [local, _self_]")
    recipe = list(itertools.takewhile(lambda line: line.startswith("#   "), lines[start:]))
    return "".join(line[4:] + "\n" for line in recipe)


def add_entry(root: Path, relpath: str, text: str) -> list[str]:
    """Write a data entry where a user would (<dir>/data/<name>.yaml); the overrides that select it."""
    path = root / relpath
    assert path.parent.name == "data", relpath
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return [f"data={path.stem}", f"hydra.searchpath=[file://{path.parent.parent}]"]


def assert_domains_as_printed(cfg, printed: dict) -> None:
    assert cfg.data.name == printed["name"]
    assert sorted(cfg.data.domains) == sorted(printed["domains"])
    for name, domain in printed["domains"].items():
        for key, value in domain.items():
            assert getattr(cfg.data.domains[name], key) == value, (name, key)


def test_the_readmes_multi_domain_entry_has_exactly_its_own_domains(tmp_path):
    """`defaults: [local, _self_]` must not bring local's `text` placeholder along (it was refused as empty)."""
    relpath, text = readme_recipe()
    printed = yaml.safe_load(text)
    assert "text" not in printed["domains"]
    entry = add_entry(tmp_path, relpath, text)
    assert_domains_as_printed(compose_validated(entry), printed)
    assert_domains_as_printed(compose_validated([*entry, "task=tokenize"]), printed)
    # Given paths on the command line, local's text domain is the user's too.
    both = compose_validated([*entry, "data.domains.text.paths=[prose/]"])
    assert sorted(both.data.domains) == sorted([*printed["domains"], "text"])
    assert both.data.domains["text"].paths == ["prose/"]


def test_local_yamls_printed_entry_has_exactly_its_own_domains(tmp_path):
    text = local_yaml_recipe()
    printed = yaml.safe_load(text)
    assert_domains_as_printed(compose_validated(add_entry(tmp_path, f"mine/data/{printed['name']}.yaml", text)),
                              printed)


def test_an_entrys_own_domain_without_paths_is_refused_not_dropped(tmp_path):
    # Named in the entry (text_fields set), `text` is the entry's own: forgetting its paths is a mistake to report.
    text = ("defaults: [local, _self_]\nname: half\n"
            "domains:\n  text: {text_fields: [body]}\n  code: {paths: [a.jsonl]}\n")
    with pytest.raises(UserError, match=r"^data\.domains\.text\.paths is empty"):
        compose_validated(add_entry(tmp_path, "mine/data/half.yaml", text))


@pytest.mark.parametrize("task", ["train", "tokenize"])
def test_data_local_without_paths_is_still_refused_with_the_same_line(task):
    with pytest.raises(UserError) as err:
        compose_validated(["data=local", f"task={task}"])
    assert str(err.value) == ("data.domains.text.paths is empty; data.source=local needs files per domain, for "
                              "example data.domains.text.paths=[corpus/*.jsonl]")


@pytest.mark.slow
def test_the_readmes_entry_tokenizes_only_its_own_domains_through_the_cli(tmp_path):
    relpath, text = readme_recipe()
    entry = add_entry(tmp_path / "conf", relpath, text)
    files = tmp_path / "repos" / "mine"  # where the recipe's relative glob finds them, from the working directory
    files.mkdir(parents=True)
    rows = [json.dumps({"content": f"def f{i}(x):\n    return x * {i} + {i * i}\n"}) for i in range(60)]
    (files / "part.jsonl").write_text("\n".join(rows) + "\n")
    result = run_cli(["task=tokenize", *entry, f"data.shards_dir={tmp_path / 'shards'}",
                      f"data.cache_dir={tmp_path / 'cache'}", "data.eval_tokens=100", "data.tokenize_workers=1",
                      f"run.output_dir={tmp_path}"], cwd=tmp_path)
    assert_ok(result)
    assert sorted(p.name for p in (tmp_path / "shards").iterdir()) == ["code"]
    [recorded] = tmp_path.glob("tokenize/*/resolved_config.yaml")
    assert sorted(yaml.safe_load(recorded.read_text())["data"]["domains"]) == ["code"]


def test_cfg_job_prints_the_composed_config_without_importing_torch(tmp_path):
    result = run_cli(["--cfg", "job", "preset=dense", "model.n_layer=3"], cwd=tmp_path,
                     launcher=[sys.executable, "-X", "importtime"])
    assert result.returncode == 0, result.stderr
    assert "n_layer: 3" in result.stdout and "preset: dense" in result.stdout
    imported = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if "|" in line}
    assert "torch" not in imported and "transformers" not in imported


def test_validate_tells_what_to_write_for_a_value_of_the_wrong_type():
    # A config composed without Hydra's schema (a notebook, another launcher) reaches validate() unchecked;
    # it must answer as the command line does.
    from omegaconf import OmegaConf

    for raw, needle in (({"model": {"family": "moe", "topk": "two"}}, "model.topk: Value 'two'"),
                        ({"model": {"family": "moe", "topk": "two"}}, "expected an integer, for example model.topk=1"),
                        ({"optim": {"learning_rate": "fast"}}, "expected a number, for example optim.learning_rate="),
                        ({"optim": {"warmup_steps": "x"}}, "expected an integer or null")):
        with pytest.raises(UserError) as err:
            validate(OmegaConf.create(raw))
        assert needle in str(err.value), str(err.value)


@pytest.mark.parametrize("args,needle", [
    (["train.max_step=3"], "did you mean 'max_steps'"),
    (["preset=nope"], "preset=nope is not a config"),
    (["preset=polyglu-pretrain", "model.n_layers=abc"], "expected an integer"),
    ([str(ROOT / "tests")], "is a path, not an override"),  # e.g. a run directory
])
def test_param_count_answers_config_mistakes_like_the_trainer(tmp_path, args, needle):
    result = subprocess.run([sys.executable, "-m", "eval.param_count", *args], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], result.stderr


@pytest.mark.parametrize("name", ["../../escaped", "nested/run", "..", "/tmp/elsewhere"])
def test_run_name_must_be_a_plain_directory_name(tmp_path, name):
    """run.name picks a directory inside run.output_dir; a path is refused in one line before Hydra creates
    anything, so nothing is written outside run.output_dir (nor inside it)."""
    output_dir = tmp_path / "a" / "b"
    result = run_cli([f"run.output_dir={output_dir}", f"run.name={name}"], cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == [f"error: run.name={name!r} is not a plain directory name; the run goes to "
                     "run.output_dir/run.name, so give a name without '/' (such as run.name=my-run), and put the "
                     "directory in run.output_dir"]
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == []
    with pytest.raises(UserError, match="not a plain directory name"):
        compose_validated([f"run.name={name}"])
