"""The data of the `embedded_math` task (tasks/embedded_math.yaml): held-out problems of the project's own math
generator (data/sources/math_problems.py) in gsm8k's format, so a model can be benchmarked on a machine with no hub.
"""

from __future__ import annotations

from data.sources.math_problems import benchmark_problems

TEST_SIZE = 500  # as many as MATH-500 has
FEWSHOT_POOL = 20  # the few-shot examples are drawn from these, never from the test problems


def gsm8k_rows(problems) -> list[dict[str, str]]:
    """gsm8k's fields: the question, and the worked solution whose last line is `#### <answer>`."""
    return [{"question": question, "answer": "\n".join(steps) + f"\n#### {answer}"}
            for question, steps, answer in problems]


def dataset(**_metadata):
    """lm-eval's `custom_dataset` hook (it passes the task's metadata, which this data does not need)."""
    import datasets

    rows = gsm8k_rows(benchmark_problems(TEST_SIZE + FEWSHOT_POOL))
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows[:TEST_SIZE]),
                                 "train": datasets.Dataset.from_list(rows[TEST_SIZE:])})
