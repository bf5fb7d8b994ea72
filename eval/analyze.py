"""Routing analysis of a finished run or a snapshot: the family's figures (models/<family>/analysis.py), as every
routed run draws them at its end, into the run's figures/ (or --output).

    python -m eval.analyze outputs/moe-main                       # expert usage, specialisation over time
    python -m eval.analyze outputs/polyglu-shakedown              # the seven PolyGLU outputs, eval domains
    python -m eval.analyze outputs/polyglu-shakedown/final-model.safetensors \\
        --prompts eval/prompts/math_categories.jsonl --output figures/math   # arithmetic / algebra / geometry

PolyGLU measures its input-dependent routing on samples by category: by default the first blocks of each of the
run's eval domains (rebuilt from the run's data config), or named categories from --prompts, a JSON Lines file of
{"category": ..., "text": ...}. A dense run has no routing, and says so.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

from eval.generate import load_snapshot_model, snapshot_in
from models.analysis import RoutingEvidence
from models.registry import routing_analysis
from trainer.base.errors import UserError
from trainer.checkpoint import load_model_snapshot
from trainer.checkpoint.files import SIDECAR_SUFFIX
from trainer.config.validate import RECORDED_CONFIG, validate
from trainer.routing_analysis import FIGURES_DIR, SAMPLE_BLOCKS, eval_samples, read_eval_history
from trainer.tracking import METRICS_FILE


def read_prompts(path: Path, encode) -> dict[str, list[dict]]:
    """{category: one batch per prompt} from JSON Lines of {"category": str, "text": str}, in file order."""
    if not path.is_file():
        raise UserError(f"--prompts {path} does not exist; give a JSON Lines file of "
                        '{"category": ..., "text": ...}, for example eval/prompts/math_categories.jsonl')
    samples: dict[str, list[dict]] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if not (isinstance(row, dict) and isinstance(row.get("category"), str) and isinstance(row.get("text"), str)
                and row["category"].strip() and row["text"].strip()):
            raise UserError(f"--prompts {path} line {number}: expected a JSON object with a non-empty "
                            f'"category" and "text", got {line[:80]!r}')
        ids = encode(row["text"])
        samples.setdefault(row["category"], []).append({"input_ids": torch.tensor([ids], dtype=torch.long)})
    if not samples:
        raise UserError(f"--prompts {path} holds no prompts")
    return samples


def run_eval_domains(meta: dict, max_blocks: int) -> dict[str, list[dict]]:
    """The first blocks of each eval domain of the run that wrote the snapshot, rebuilt from its data config."""
    from data.build import build_data

    cfg = validate(OmegaConf.create(meta["config"]))
    try:
        data = build_data(cfg.data, seed=cfg.data.split_seed)
    except UserError as err:
        raise UserError(f"the run's eval domains cannot be rebuilt here ({err}); pass --prompts with named "
                        "categories instead") from None
    return eval_samples(data.eval, max_blocks)


def family_and_architecture(run_dir: Path, snapshot: Path | None) -> tuple[str, dict]:
    """From the snapshot's sidecar when there is one, else from the run's resolved_config.yaml."""
    if snapshot is not None:
        meta = load_model_snapshot_meta(snapshot)
        return meta["architecture"]["family"], meta["architecture"]
    recorded = run_dir / RECORDED_CONFIG
    if not recorded.is_file():
        raise UserError(f"{run_dir} holds neither a model snapshot nor {RECORDED_CONFIG}; pass a run directory "
                        "written by trainer/run.py, or one of its <stem>.safetensors")
    model = OmegaConf.to_container(OmegaConf.load(recorded).get("model", {}))
    return model.get("family", "dense"), model


def load_model_snapshot_meta(snapshot: Path) -> dict:
    """The sidecar alone when it is beside the weights (no tensors read), else the metadata the weights carry."""
    sidecar = snapshot.with_suffix(SIDECAR_SUFFIX)
    if sidecar.is_file():
        return json.loads(sidecar.read_text())
    return load_model_snapshot(snapshot)[1]


def find_snapshot(path: Path) -> Path | None:
    """The snapshot a path names: itself, or a run directory's final (else best) model; None when a run has none."""
    try:
        return snapshot_in(path)
    except UserError:
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", type=Path, help="a run directory, or a <stem>.safetensors snapshot of one")
    parser.add_argument("--prompts", type=Path, help='JSON Lines of {"category": ..., "text": ...}: named categories '
                                                     "for PolyGLU's dynamic routing (default: the run's eval domains)")
    parser.add_argument("--output", type=Path, help="where the figures go (default: <run dir>/figures)")
    parser.add_argument("--max-blocks", type=int, default=SAMPLE_BLOCKS,
                        help=f"eval blocks per domain run through the model (default {SAMPLE_BLOCKS})")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    try:
        path = args.path
        if not path.exists():
            raise UserError(f"{path} does not exist; pass a run directory or a <stem>.safetensors snapshot")
        run_dir = path if path.is_dir() else path.parent
        snapshot = find_snapshot(path) if path.is_dir() else path
        family, architecture = family_and_architecture(run_dir, snapshot)
        analysis = routing_analysis(family)
        if analysis is None:
            print(f"{path}: a {family} run has no routing to analyse")
            return 0
        evidence = RoutingEvidence(architecture=architecture, history=read_eval_history(run_dir))
        if analysis.NEEDS_MODEL:
            if snapshot is None:
                raise UserError(f"{run_dir} holds no final-model or best-model snapshot; the {family} analysis "
                                "reads the weights: pass a run that finished an eval, or a model-step-<n>.safetensors")
            model, tokenizer, meta = load_snapshot_model(snapshot)
            evidence.model = model.to(args.device)
            evidence.samples = (read_prompts(args.prompts, tokenizer.encode) if args.prompts
                                else run_eval_domains(meta, args.max_blocks))
        elif args.prompts:
            print(f"note: --prompts is read by analyses that run the model; {family} figures come from the run's "
                  f"evals ({METRICS_FILE})", file=sys.stderr)
        elif not evidence.history:
            raise UserError(f"{run_dir} has no eval in {METRICS_FILE}; the {family} figures are drawn from its evals")
        written = analysis.analyze(evidence, args.output or run_dir / FIGURES_DIR)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for file in written:
        print(file)
    if not written:
        print(f"{path}: no eval of this run carries routing statistics; nothing to draw", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
