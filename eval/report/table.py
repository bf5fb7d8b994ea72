"""A report's table: one row per job, laid out for people (report.md) and for tools (report.csv).

Columns: the overrides that differ between the jobs (only those; the ones they share are said once), the family,
the status and why, steps, tokens, wall time (every launch of the run, data preparation included), training
tokens per second (the median of the loop's measurements), parameters, best and final eval loss overall and
per domain, the final loss's difference to the baseline job, and each routed family's own columns
(models/<family>/report.py).
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from typing import Any

from eval.report.jobs import Job
from models.registry import family_report
from trainer.base.errors import UserError
from trainer.base.metrics import TOKENS, TOKENS_PER_SEC


@dataclass
class Table:
    jobs: list[Job]
    baseline: Job | None
    varying: list[str]  # override keys whose value differs between jobs, in the order they were first given
    common: dict[str, str]  # overrides every job was launched with, alike
    domains: list[str]  # eval domains, in the order the runs logged them
    family_columns: dict[str, str]  # a family column's name -> what it measures, for the legend
    rows: list[dict[str, Any]] = field(default_factory=list)  # one per job: the CSV's fields, raw values

    @property
    def fields(self) -> list[str]:
        per_domain = [f"eval_{domain}_{kind}" for domain in self.domains for kind in ("best", "final")]
        return ["job", "path", *self.varying, "family", "status", "why", "steps", "max_steps", "tokens", "wall_time_s",
                "tokens_per_s", "parameters", "best_eval_loss", "final_eval_loss", "vs_baseline_pct", *per_domain,
                *self.family_columns]


def pick_baseline(jobs: list[Job], wanted: str | None) -> Job | None:
    """The job named `wanted` (its name, its directory's name, or its sweep job number); by default the first
    job with an eval loss (in the seed's matrix, preset=dense,moe-main,...: dense)."""
    if wanted is None:
        return next((job for job in jobs if job.record.final_eval is not None), None)  # an eval has eval/loss
    matches = [job for job in jobs if wanted in (job.name, job.path.name) or job.path.name.startswith(f"{wanted}_")
               or job.path.name.partition("_")[2] == wanted]
    names = ", ".join(job.name for job in jobs)
    if not matches:
        raise UserError(f"--baseline {wanted!r} names none of the compared jobs; pick one of: {names}")
    if len(matches) > 1:
        raise UserError(f"--baseline {wanted!r} names {len(matches)} jobs ({', '.join(j.name for j in matches)}); "
                        "give one job's full name")
    return matches[0]


def _varying_overrides(jobs: list[Job]) -> tuple[list[str], dict[str, str]]:
    keys = list(dict.fromkeys(key for job in jobs for key in job.overrides))
    varying = [key for key in keys if len({job.overrides.get(key) for job in jobs}) > 1]
    common = {key: jobs[0].overrides[key] for key in keys if key not in varying}
    return varying, common


def family_module(family: str | None):
    if family is None:
        return None
    try:
        return family_report(family)
    except UserError:
        return None  # a family this checkout does not know (a plugin's): its rows have no family columns


def _losses(job: Job) -> dict[str, Any]:
    """Best and final eval loss, overall (eval/loss) and per domain, from the run's eval records."""
    found: dict[str, Any] = {}
    evals = [evaluation for _, evaluation in job.record.evals]
    overall = [e.loss for e in evals if e.loss is not None]
    if overall:
        found["best_eval_loss"], found["final_eval_loss"] = min(overall), overall[-1]
    for domain in dict.fromkeys(d for e in evals for d in e.domains):
        values = [e.domains[domain].loss for e in evals if domain in e.domains and e.domains[domain].loss is not None]
        if values:
            found[f"eval_{domain}_best"], found[f"eval_{domain}_final"] = min(values), values[-1]
    return found


def _progress(job: Job) -> dict[str, Any]:
    summary = job.summary or {}
    last = job.record.rows[-1] if job.record.rows else {}
    # Training throughput, as the loop measures it over windows of updates: the median window, so neither data
    # preparation (the first job of a sweep tokenizes, the others find the cache) nor an eval skews it.
    throughput = sorted(value for _, value in job.record.series(TOKENS_PER_SEC))
    return {"steps": summary.get("final_step", last.get("step")),
            "max_steps": summary.get("max_steps", job.config.get("train", {}).get("max_steps")),
            "tokens": summary.get("tokens_seen", job.record.last(TOKENS)), "wall_time_s": summary.get("wall_time_s"),
            "tokens_per_s": throughput[len(throughput) // 2] if throughput else None,
            "parameters": summary.get("n_parameters")}


def build_table(jobs: list[Job], baseline: str | None = None) -> Table:
    if not jobs:
        raise UserError("no training runs to compare")
    varying, common = _varying_overrides(jobs)
    base = pick_baseline(jobs, baseline)
    table = Table(jobs=jobs, baseline=base, varying=varying, common=common, domains=[], family_columns={})
    base_loss = _losses(base).get("final_eval_loss") if base is not None else None
    for job in jobs:
        losses = _losses(job)
        module = family_module(job.family)
        family = module.columns(job.record) if module is not None else {}
        if module is not None:
            table.family_columns.update(module.COLUMNS)
        final = losses.get("final_eval_loss")
        table.rows.append({
            "job": job.name, "path": str(job.path), **{key: job.overrides.get(key, "") for key in varying},
            "family": job.family, "status": job.status, "why": job.why if job.status != "completed" else None,
            **_progress(job), **losses,
            "vs_baseline_pct": (100.0 * (final - base_loss) / base_loss
                                if final is not None and base_loss and job is not base else None),
            **family,
        })
        table.domains.extend(d for d in (job.record.final_eval.domains if job.record.final_eval else {})
                             if d not in table.domains)
    return table


# ------------------------------------------------------------------------------------------------ report.csv

def to_csv(table: Table) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=table.fields, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in table.rows:
        writer.writerow({key: "" if row.get(key) is None else row[key] for key in table.fields})
    return out.getvalue()


# ------------------------------------------------------------------------------------------------ report.md

def _number(value: Any, digits: int = 4) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else "inf"
    if isinstance(value, int):
        return str(value)
    return f"{value:.{digits}g}" if abs(value) >= 1e4 or abs(value) < 1e-3 else f"{value:.{digits}f}"


def _count(value: Any) -> str:
    if value is None:
        return ""
    for size, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(value) >= size:
            return f"{value / size:.2f}{unit}"
    return f"{value:.0f}"


def _duration(seconds: Any) -> str:
    if seconds is None:
        return ""
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h {minutes:02d}m" if hours else f"{minutes}m {secs:02d}s" if minutes else f"{secs}s"


def _percent(value: Any) -> str:
    return "" if value is None else f"{value:+.2f}%"


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(_cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return lines


def _status(row: dict) -> str:
    status = row["status"].replace("_", " ")
    return f"{status}: {row['why']}" if row.get("why") else status


def to_markdown(table: Table, title: str, figures: list[str]) -> str:
    base = table.baseline
    lines = [f"# {title}", ""]
    if table.common:
        lines.append("Every job: `" + " ".join(f"{k}={v}" for k, v in table.common.items()) + "`  ")
    if base is not None:
        lines.append(f"Baseline: `{base.name}`; the last column is each job's final eval loss against the "
                     "baseline's (negative: lower loss).")
    else:
        lines.append("No job has an eval loss yet, so none is the baseline.")
    lines.append("")
    header = ["job", *(f"`{key}`" for key in table.varying), "family", "status", "steps", "tokens", "wall time",
              "tokens/s", "parameters", "best eval loss", "final eval loss",
              f"vs {base.name}" if base is not None else "vs baseline"]
    rows = []
    for row, job in zip(table.rows, table.jobs, strict=True):
        steps = "" if row["steps"] is None else f"{row['steps']}" + (f"/{row['max_steps']}" if row["max_steps"] and
                                                                     row["steps"] != row["max_steps"] else "")
        rows.append([row["job"], *(row[key] for key in table.varying), row["family"] or "", _status(row), steps,
                     _count(row["tokens"]), _duration(row["wall_time_s"]), _count(row["tokens_per_s"]),
                     _count(row["parameters"]), _number(row.get("best_eval_loss")),
                     _number(row.get("final_eval_loss")),
                     "baseline" if job is base else _percent(row["vs_baseline_pct"])])
    lines += _markdown_table(header, rows)
    if table.domains:
        lines += ["", "## Eval loss per domain: final (best)", ""]
        lines += _markdown_table(["job", *table.domains], [
            [row["job"], *(f"{_number(row.get(f'eval_{d}_final'))} ({_number(row.get(f'eval_{d}_best'))})"
                           if row.get(f"eval_{d}_final") is not None else "" for d in table.domains)]
            for row in table.rows])
    if table.family_columns:
        lines += ["", "## Routing", ""]
        routed = [row for row in table.rows if any(row.get(name) is not None for name in table.family_columns)]
        lines += _markdown_table(["job", "family", *table.family_columns],
                                 [[row["job"], row["family"] or "", *(_number(row.get(name), 3)
                                                                      for name in table.family_columns)]
                                  for row in routed])
        lines += [""] + [f"- `{name}`: {meaning}" for name, meaning in table.family_columns.items()]
    if figures:
        lines += ["", "## Curves", ""] + [f"![{name}]({name})" for name in figures]
    return "\n".join(lines) + "\n"
