"""The sweep report: one table and a few figures comparing runs, written at the end of every --multirun sweep
(sweep_callback.py, a Hydra callback in conf/config.yaml) and by `python -m eval.compare`.

jobs.py reads what each run directory recorded, table.py lays the rows out (report.md, report.csv), figures.py
draws the curves, write.py puts them in the report's directory.
"""
