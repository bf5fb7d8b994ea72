"""lm-evaluation-harness for every family: `python -m eval.harness <run dir | snapshot> --tasks ...`.

adapter.py is the lm-eval model class; tasks/ the task YAMLs that ship with the project (embedded_math, offline,
and MATH-500 scored by math-verify); cli.py the command; results.py the JSON files and the printed table.
Nothing here imports lm-eval at package import: the command decides whether the hub is reachable first, and
`datasets` reads that decision from the environment when it is imported.
"""
