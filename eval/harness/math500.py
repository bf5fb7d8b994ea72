"""MATH-500 scored by math-verify with the antlr4 runtime Hydra needs (4.9.3): tasks/minerva_math500.yaml.

The conflict: lm-eval's minerva_math500 scores two metrics. Its `exact_match` compares answers with sympy's LaTeX
parser, which needs antlr4-python3-runtime 4.11 (`lm-eval[math]` pins it, and the task's utils module asserts it at
import); hydra-core 1.3's generated grammar needs exactly 4.9.3. Its `math_verify` metric needs neither: math-verify
parses LaTeX through latex2sympy2_extended, which ships parsers for 4.9.3 (`math-verify[antlr4-9-3]`).

The route: this project's minerva_math500 (it shadows lm-eval's, which cannot load next to Hydra) is lm-eval's task
less `exact_match`. Its dataset, prompt, four few-shot examples, answer normalisation and stop string are lm-eval's
own functions, imported from lm-eval's module with its version assertion answered for the import alone (nothing
taken from it calls the sympy parser); `process_results` is lm-eval's math_verify lines.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import sys
from unittest import mock

from math_verify import parse, verify

_MINERVA = "lm_eval.tasks.minerva_math.utils"


def _minerva_utils():
    if _MINERVA in sys.modules:
        return sys.modules[_MINERVA]
    real_version = importlib.metadata.version

    def version(name: str) -> str:
        return "4.11" if name == "antlr4-python3-runtime" else real_version(name)

    with mock.patch("importlib.metadata.version", version):
        return importlib.import_module(_MINERVA)


def doc_to_text(doc: dict) -> str:
    return _minerva_utils().doc_to_text(doc)


def process_docs(dataset):
    return _minerva_utils().process_docs(dataset)


def list_fewshot_samples() -> list[dict]:
    return _minerva_utils().list_fewshot_samples()


def process_results(doc: dict, results: list[str]) -> dict[str, int]:
    return {"math_verify": 1 if verify(gold=parse(doc["solution"]), target=parse(results[0])) else 0}
