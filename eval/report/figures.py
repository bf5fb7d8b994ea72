"""A report's curves, one line per job in one colour throughout: eval loss (a panel for all domains and one per
domain), the smoothed training LM loss, and the routed families' own panels (models/<family>/report.py)."""

from __future__ import annotations

from pathlib import Path

from eval.report.jobs import Job
from eval.report.table import Table, family_module
from models.figures import panel_grid, pyplot, save
from trainer.base.metrics import TRAIN_LM_LOSS

EVAL_LOSS_FIGURE = "eval_loss.png"
TRAIN_LOSS_FIGURE = "train_loss.png"
ROUTING_FIGURE = "routing.png"


def smoothed(points: list[tuple[int, float]], window: int) -> list[tuple[int, float]]:
    """An exponential moving average over about `window` points, started at the first value (no bias to 0)."""
    alpha, average, out = 2.0 / (window + 1), None, []
    for step, value in points:
        average = value if average is None else alpha * value + (1 - alpha) * average
        out.append((step, average))
    return out


def _window(series) -> int:
    """The moving-average window for curves of up to n points: ~n/25, so a long run's noise averages out and a
    short run's curve is drawn as logged."""
    return max(1, max((len(points) for points in series), default=1) // 25)


class _Lines:
    """Each job's colour and style: the baseline dashed and black, so every panel reads against it."""

    def __init__(self, table: Table):
        colours = pyplot().get_cmap("tab10")
        others = [job for job in table.jobs if job is not table.baseline]
        self.style = {id(job): {"color": colours(i % 10), "linewidth": 1.4} for i, job in enumerate(others)}
        if table.baseline is not None:
            self.style[id(table.baseline)] = {"color": "black", "linestyle": "--", "linewidth": 1.6}

    def draw(self, ax, job: Job, points: list[tuple[int, float]], label: bool = True) -> None:
        if points:
            steps, values = zip(*points, strict=True)
            ax.plot(steps, values, label=job.name if label else None, marker="." if len(points) < 12 else None,
                    **self.style[id(job)])


def _panels(out: Path, panels: dict[str, list[tuple[Job, list[tuple[int, float]]]]], lines: _Lines, ylabel: str,
            title: str) -> Path | None:
    panels = {name: series for name, series in panels.items() if any(points for _, points in series)}
    if not panels:
        return None
    fig, axes = panel_grid(len(panels), panel_size=(4.2, 3.0), max_cols=2 if len(panels) <= 4 else 3)
    for ax, (name, series) in zip(axes, panels.items(), strict=True):
        for job, points in series:
            lines.draw(ax, job, points)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel, fontsize=8)
        ax.grid(alpha=0.3)
    handles, labels = [], []
    for ax in axes:  # every job once, from whichever panel drew it
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            if label not in labels:
                handles.append(handle)
                labels.append(label)
    fig.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 4), fontsize=8)
    fig.suptitle(title, fontsize=10)
    return save(fig, out)


def draw_figures(table: Table, out_dir: Path) -> list[Path]:
    lines = _Lines(table)
    jobs = table.jobs
    eval_panels: dict[str, list] = {"all domains": [(job, [(step, e.loss) for step, e in job.record.evals
                                                           if e.loss is not None]) for job in jobs]}
    for domain in table.domains:
        eval_panels[domain] = [(job, [(step, e.domains[domain].loss) for step, e in job.record.evals
                                      if domain in e.domains and e.domains[domain].loss is not None]) for job in jobs]
    written = [_panels(out_dir / EVAL_LOSS_FIGURE, eval_panels, lines, "eval loss", "Eval loss")]

    train = [(job, job.record.series(TRAIN_LM_LOSS)) for job in jobs]
    window = _window(points for _, points in train)
    written.append(_panels(out_dir / TRAIN_LOSS_FIGURE,
                           {f"training LM loss, moving average over ~{window} logged steps":
                            [(job, smoothed(points, window)) for job, points in train]},
                           lines, "LM loss", "Training loss"))

    # The families' curves, smoothed alike where they are logged every step (MoE's lb loss); a curve logged at
    # evals or router steps has too few points to need it.
    routing: dict[str, list] = {}
    for job in jobs:
        module = family_module(job.family)
        for name, points in (module.curves(job.record) if module is not None else {}).items():
            routing.setdefault(name, []).append((job, points))
    routing = {name: [(job, smoothed(points, _window(p for _, p in series))) for job, points in series]
               for name, series in routing.items()}
    written.append(_panels(out_dir / ROUTING_FIGURE, routing, lines, "", "Routing (per-step curves smoothed like "
                                                                          "the training loss)"))
    return [path for path in written if path is not None]
