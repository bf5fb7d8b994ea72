"""Parameter count of any composed configuration, built on the meta device (no memory is allocated).

    python -m eval.param_count preset=polyglu-pretrain        # the PolyGLU paper's PolychromaticLM
    python -m eval.param_count preset=moe-main model.num_experts=16

Takes the same overrides as trainer/run.py. The vocabulary follows the tokenizer: a trained `bpe` uses
data.tokenizer.vocab_size; hub tokenizers whose size is published are known below (no download);
--vocab-size overrides.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Published vocabulary sizes (len(tokenizer)), so a count needs no hub access.
KNOWN_VOCAB = {"gpt2": 50257, "Qwen/Qwen3-0.6B-Base": 151669}


def count(overrides: list[str], vocab_size: int | None = None) -> tuple[int, object]:
    import torch

    from models.registry import build_model
    from trainer.base.errors import UserError
    from trainer.config.validate import compose_config

    paths = [o for o in overrides if "=" not in o and Path(o).exists()]
    if paths:  # a run directory is the natural first guess; Hydra would only say it cannot parse the override
        raise UserError(f"{paths[0]} is a path, not an override; eval.param_count composes a config from the "
                        "overrides trainer/run.py takes (preset=moe-main model.num_experts=16); a finished run's "
                        "count is n_parameters in its summary.json")
    cfg = compose_config(overrides)
    tokenizer = cfg.data.tokenizer
    vocab = vocab_size or (tokenizer.vocab_size if tokenizer.name == "bpe" else KNOWN_VOCAB.get(tokenizer.name))
    if vocab is None:
        raise UserError(f"data.tokenizer.name={tokenizer.name!r} has no known vocabulary size; pass --vocab-size N")
    if getattr(cfg.model, "pretrained", None):
        raise UserError("model.pretrained is set: its size comes from the checkpoint; count with pretrained=null")
    with torch.device("meta"):
        model = build_model(cfg.model, vocab_size=vocab, eos_id=0)
    return sum(p.numel() for p in model.parameters()), cfg  # parameters() counts tied tensors once


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab-size", type=int, default=None)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from trainer.config.explain import explain

    try:
        total, cfg = count(args.overrides, args.vocab_size)
    except Exception as err:
        # The same one line as trainer/run.py for any config mistake (a typo, a wrong type, an unknown
        # preset, which Hydra raises while composing); a real bug keeps its traceback.
        message = explain(err)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return 2
    print(f"{cfg.run.preset} ({cfg.model.family}): {total:,} parameters")
    return 0


if __name__ == "__main__":
    sys.exit(main())
