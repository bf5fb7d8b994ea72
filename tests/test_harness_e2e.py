"""lm-evaluation-harness end to end, offline, on runs this suite trains: `python -m eval.harness` on a dense run,
lm-eval's simple_evaluate over MoE and PolyGLU snapshots and a fine-tuned model's chat template, each on local task
YAMLs in the formats of the seed's benchmarks (gsm8k, MATH-500, mmlu) written here, and the one-line refusal of a
hub task without the hub."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import lm_eval.tasks
import pytest

from eval.harness.cli import TASKS_DIR
from tests.conftest import ROOT, assert_ok, clean_env, tiny_run

pytestmark = pytest.mark.slow

LM_EVAL_TASKS = Path(lm_eval.tasks.__file__).parent
LOCAL_TASKS = ["local_gsm8k", "local_math500", "local_mmlu"]
LIMIT = 2
CONTEXT = 256  # the fine-tuned model's blocks hold whole conversations
GPT2 = ["model.n_layer=2", "model.n_embd=32", "model.n_head=2", f"model.n_positions={CONTEXT}"]
POLYGLU = ["model=polyglu", "model.d_model=32", "model.d_ff=64", "model.n_layers=2", "model.n_heads=4",
           "model.n_kv_heads=2", "model.head_dim=8", "model.max_seq_len=64", "model.routing_pool=causal"]
SHORT = ["train.max_steps=4", "train.eval_every=4", "checkpoint.save_every=4"]


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


@pytest.fixture(scope="module")
def local_tasks(tmp_path_factory) -> Path:
    """Task YAMLs that include lm-eval's own gsm8k and mmlu configs and this project's minerva_math500, with the
    dataset swapped for JSON Lines in each benchmark's own fields."""
    d = tmp_path_factory.mktemp("tasks")
    gsm8k = [{"question": f"Ann has {a} apples and buys {b} more. How many does she have?",
              "answer": f"She has {a} + {b} = {a + b} apples.\n#### {a + b}"} for a, b in [(2, 3), (5, 7), (10, 4)]]
    math = [{"problem": f"What is ${a} + {b}$?", "solution": f"${a} + {b} = \\boxed{{{a + b}}}$.",
             "answer": str(a + b), "subject": "Prealgebra", "level": 1, "unique_id": f"test/{a}.json"}
            for a, b in [(1, 2), (3, 4), (5, 6)]]
    mmlu = [{"question": f"What is {a} times 2?", "subject": "elementary_mathematics",
             "choices": [str(2 * a), str(a), str(a + 2), str(3 * a)], "answer": 0} for a in (3, 5, 7, 9)]
    (d / "local_gsm8k.yaml").write_text(f"""include: {LM_EVAL_TASKS / 'gsm8k' / 'gsm8k.yaml'}
task: local_gsm8k
dataset_path: json
dataset_name: null
dataset_kwargs:
  data_files:
    train: {write_jsonl(d / 'gsm8k_train.jsonl', gsm8k[:2])}
    test: {write_jsonl(d / 'gsm8k_test.jsonl', gsm8k)}
num_fewshot: 2
generation_kwargs:
  until: ["Question:", "</s>", "<|im_end|>"]
  do_sample: false
  temperature: 0.0
  max_gen_toks: 12
""")
    (d / "local_math500.yaml").write_text(f"""include: {TASKS_DIR / 'minerva_math500.yaml'}
task: local_math500
dataset_path: json
dataset_name: null
dataset_kwargs:
  data_files:
    test: {write_jsonl(d / 'math500.jsonl', math)}
generation_kwargs:
  until: ["Problem:"]
  do_sample: false
  temperature: 0
  max_gen_toks: 12
""")
    (d / "local_mmlu.yaml").write_text(f"""include: {LM_EVAL_TASKS / 'mmlu' / 'default' / '_default_template_yaml'}
task: local_mmlu
dataset_path: json
dataset_name: null
dataset_kwargs:
  data_files:
    dev: {write_jsonl(d / 'mmlu_dev.jsonl', mmlu[:1])}
    test: {write_jsonl(d / 'mmlu_test.jsonl', mmlu[1:])}
num_fewshot: 1
""")
    return d


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_cache) -> Path:
    out = tmp_path_factory.mktemp("harness-runs")
    assert_ok(tiny_run(out, data_cache, *SHORT, name="dense", model_sizes=GPT2))
    return out


def run_harness(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "eval.harness", *args], cwd=ROOT, env=clean_env(),
                          capture_output=True, text=True, timeout=600)


def scores(results: dict, task: str) -> dict:
    return {k: v for k, v in results["results"][task].items() if k != "alias"}


def assert_scored(results: dict, tasks: list[str], limit: int = LIMIT) -> None:
    for task in tasks:
        assert results["n-samples"][task]["effective"] == limit, task
    assert 0 <= scores(results, "local_mmlu")["acc,none"] <= 1
    assert scores(results, "local_math500")["math_verify,none"] in (0, 0.5, 1)
    assert {"exact_match,strict-match", "exact_match,flexible-extract"} <= set(scores(results, "local_gsm8k"))


def test_the_command_scores_a_run_offline(runs, local_tasks, tmp_path):
    output = tmp_path / "results.json"
    result = run_harness(str(runs / "dense"), "--tasks", "embedded_math", *LOCAL_TASKS, "--include-path",
                         str(local_tasks), "--limit", str(LIMIT), "--batch-size", "2", "--output", str(output))
    assert_ok(result)
    results = json.loads(output.read_text())
    assert_scored(results, ["embedded_math", *LOCAL_TASKS])
    assert results["configs"]["embedded_math"]["num_fewshot"] == 5
    # The same JSON beside the run, and the table: task, metric, value, stderr, n.
    kept, = (runs / "dense" / "eval").glob("lm_eval-final-model-*.json")
    assert json.loads(kept.read_text())["results"] == results["results"]
    table = result.stdout[result.stdout.index("task "):].splitlines()
    assert table[0].split() == ["task", "metric", "value", "stderr", "n"]
    assert any(line.split()[:2] == ["embedded_math", "exact_match"] and line.split()[-1] == str(LIMIT)
               for line in table)
    assert any(line.split()[:2] == ["local_math500", "math_verify"] for line in table)


def test_a_hub_task_without_the_hub_is_refused_in_one_line(runs):
    result = run_harness(str(runs / "dense"), "--tasks", "gsm8k", "--limit", "1")
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "openai/gsm8k" in errors[0] and "--include-path" in errors[0], result.stderr[-2000:]


def evaluate(snapshot, local_tasks, tasks=LOCAL_TASKS, **kwargs) -> dict:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from eval.harness.adapter import RoutedLM

    manager = TaskManager(include_defaults=False, include_path=[str(TASKS_DIR), str(local_tasks)])
    lm = RoutedLM(str(snapshot), batch_size=2, device="cpu")
    return simple_evaluate(model=lm, tasks=list(tasks), limit=LIMIT, task_manager=manager, **kwargs)


@pytest.mark.parametrize("family", ["moe", "polyglu"])
def test_moe_and_polyglu_snapshots_run_through_simple_evaluate(family, runs, data_cache, local_tasks):
    sizes = [*GPT2, "model=moe", "model.moe_layers=[1]", "model.num_experts=4"] if family == "moe" else POLYGLU
    assert_ok(tiny_run(runs, data_cache, *SHORT, name=family, model_sizes=sizes))
    results = evaluate(runs / family / "final-model.safetensors", local_tasks)
    assert_scored(results, LOCAL_TASKS)


def test_a_fine_tuned_model_is_prompted_through_its_chat_template(runs, data_cache, local_tasks):
    assert_ok(tiny_run(runs, data_cache, "preset=sft", f"data.block_size={CONTEXT}", "data.size_mb=0.02",
                       "train.max_steps=2", "train.eval_every=1000", f"run.init_from={runs / 'dense'}",
                       name="sft", model_sizes=GPT2))
    results = evaluate(runs / "sft", local_tasks, tasks=["local_gsm8k"], apply_chat_template=True,
                       fewshot_as_multiturn=True, log_samples=True)
    prompt = results["samples"]["local_gsm8k"][0]["arguments"][0][0]
    # Two few-shot examples as earlier turns, then the question, then the assistant's turn opened.
    assert prompt.startswith("<|im_start|>user\nQuestion:") and prompt.count("<|im_start|>assistant\n") == 3
    assert prompt.endswith("Answer:<|im_end|>\n<|im_start|>assistant\n")
