"""Score a run's model on lm-evaluation-harness tasks.

    python -m eval.harness outputs/quickstart --tasks embedded_math --limit 50
    python -m eval.harness outputs/sft-dense --tasks gsm8k minerva_math500 mmlu_stem --apply-chat-template \\
        --output results.json
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
import sys
from pathlib import Path

from trainer.base.errors import UserError
from trainer.base.hub import hub_reachable

TASKS_DIR = Path(__file__).parent / "tasks"
_OFFLINE_ENV = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m eval.harness", description=__doc__.splitlines()[0])
    p.add_argument("snapshot", help="a run directory (its final-model, else best-model) or a <stem>.safetensors")
    p.add_argument("--tasks", nargs="+", required=True,
                   help="lm-eval task or group names (gsm8k minerva_math500 mmlu_stem ...); embedded_math runs "
                        "offline")
    p.add_argument("--limit", type=float, help="at most this many documents per task (a fraction if below 1)")
    p.add_argument("--num-fewshot", type=int, help="few-shot examples per prompt (default: each task's own)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--output", type=Path, help="also write lm-eval's results JSON here")
    p.add_argument("--include-path", action="append", default=[], type=Path, metavar="DIR",
                   help="a directory of task YAMLs (local data, new tasks); may repeat")
    p.add_argument("--apply-chat-template", action="store_true",
                   help="prompt a fine-tuned model (preset=sft) through its ChatML turns; few-shot examples "
                        "become earlier turns")
    p.add_argument("--max-gen-toks", type=int, help="new-token budget of generation tasks that set none")
    p.add_argument("--device", help="cuda or cpu (default: cuda when there is one)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                   help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--log-samples", action="store_true", help="keep every prompt and answer in the results JSON")
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        check_arguments(args)
        if not hub_reachable():
            # Read by datasets and huggingface_hub at import: a hub task then fails at once instead of retrying.
            os.environ.update({name: "1" for name in _OFFLINE_ENV})
        results, snapshot = evaluate(args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from eval.harness.results import format_table, table_rows, write_results

    for path in write_results(results, snapshot, args.output):
        print(f"wrote {path}")
    print(format_table(table_rows(results)))
    return 0


def check_arguments(args: argparse.Namespace) -> None:
    from eval.generate import snapshot_in

    if args.batch_size < 1:
        raise UserError(f"--batch-size {args.batch_size} must be >= 1")
    if args.limit is not None and args.limit <= 0:
        raise UserError(f"--limit {args.limit} must be positive (a count, or a fraction below 1)")
    if args.num_fewshot is not None and args.num_fewshot < 0:
        raise UserError(f"--num-fewshot {args.num_fewshot} must be >= 0")
    if args.max_gen_toks is not None and args.max_gen_toks < 1:
        raise UserError(f"--max-gen-toks {args.max_gen_toks} must be >= 1")
    for path in args.include_path:
        if not path.is_dir():
            raise UserError(f"--include-path {path} is not a directory; pass one that holds task YAMLs")
    args.snapshot = snapshot_in(Path(args.snapshot))


def evaluate(args: argparse.Namespace) -> tuple[dict, Path]:
    """lm-eval's simple_evaluate over the adapter; returns its results and the snapshot scored."""
    from lm_eval import simple_evaluate

    from eval.harness.adapter import DEFAULT_MAX_GEN_TOKS, RoutedLM

    # The model first: a snapshot that is missing or unreadable is refused (by the snapshot loader) before the task
    # index is built.
    lm = RoutedLM(str(args.snapshot), batch_size=args.batch_size, device=args.device, dtype=args.dtype,
                  max_gen_toks=args.max_gen_toks or DEFAULT_MAX_GEN_TOKS, seed=args.seed)
    manager = task_manager(args.tasks, args.include_path)
    check_tasks(manager, args.tasks, args.include_path)
    try:
        results = simple_evaluate(
            model=lm, tasks=list(args.tasks), num_fewshot=args.num_fewshot, limit=args.limit,
            batch_size=args.batch_size, task_manager=manager, apply_chat_template=args.apply_chat_template,
            log_samples=args.log_samples, random_seed=args.seed, numpy_random_seed=args.seed,
            torch_random_seed=args.seed, fewshot_random_seed=args.seed)
    except ConnectionError as err:  # datasets' "Couldn't reach '<dataset>' on the Hub"
        raise UserError(offline_message(args.tasks, err)) from None
    return results, args.snapshot


def task_manager(names: list[str], include_paths: list[Path]):
    """lm-eval's task index over this project's tasks and --include-path, and over lm-eval's own only when a task
    asked for is not there: indexing all of lm-eval's YAMLs takes about 15 s."""
    from lm_eval.tasks import TaskManager

    paths = [str(TASKS_DIR), *map(str, include_paths)]
    local = TaskManager(include_defaults=False, include_path=paths)
    if set(names) <= set(local.all_tasks):
        return local
    return TaskManager(include_path=paths)


def check_tasks(manager, names: list[str], include_paths: list[Path]) -> None:
    known = set(manager.all_tasks)
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=3)
            where = "lm-eval" + (f" or --include-path {', '.join(map(str, include_paths))}" if include_paths else "")
            hint = f"; did you mean {', '.join(close)}?" if close else "; `lm-eval ls tasks` lists them"
            raise UserError(f"--tasks {name}: no such task or group in {where}{hint}")


def offline_message(tasks: list[str], err: Exception) -> str:
    # datasets says "Couldn't reach 'openai/gsm8k' on the Hub": the quoted name without spaces.
    found = re.search(r"'([^'\s]+)'", str(err))
    dataset = found.group(1) if found else "its dataset"
    return (f"--tasks {' '.join(tasks)}: dataset {dataset} is on the Hugging Face Hub, which this machine cannot "
            f"reach; run where the Hub (or a datasets cache holding it) is, or pass --include-path DIR with a task "
            f"YAML over local files (embedded_math runs offline; {TASKS_DIR / 'embedded_math.yaml'} shows the form)")
