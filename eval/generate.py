"""Text from a model-only snapshot: rebuilds the model from the sidecar (family, sizes, MoE layout),
loads the safetensors weights and the run's saved tokenizer, and samples a continuation.

    python -m eval.generate outputs/moe-main/final-model.safetensors --prompt "def fibonacci(" --max-new-tokens 60
    python -m eval.generate outputs/sft-dense --chat --temperature 0 --prompt "What is 12 + 7 x 3?"
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from data.chat.format import encode_prompt
from data.tokenizer import IM_END, load_saved_tokenizer
from eval.decoding import generate
from models.registry import FAMILIES, build_model, config_schema
from trainer.base.errors import UserError
from trainer.checkpoint import BEST_MODEL, FINAL_MODEL, load_model_snapshot, snapshot_paths


def load_snapshot_model(snapshot: str | Path):
    """(model in eval mode, tokenizer, sidecar metadata) from <stem>.safetensors + <stem>.json."""
    state, meta = load_model_snapshot(snapshot)
    model_cfg_raw = dict(meta["config"]["model"])
    family = model_cfg_raw["family"]
    if family not in FAMILIES:
        raise UserError(f"{snapshot} was written by model family {family!r}, which this version does not know")
    architecture = meta["architecture"]
    model_cfg = config_schema(family)(**model_cfg_raw).rebuilt(architecture)
    tokenizer = load_saved_tokenizer(Path(snapshot).parent / "tokenizer")
    model = build_model(model_cfg, vocab_size=architecture["vocab_size"], eos_id=tokenizer.eos_id)
    model.load_state_dict(state)
    return model.eval(), tokenizer, meta


def snapshot_in(path: Path) -> Path:
    """A snapshot path as given, or the one a run directory holds: its final model, else its best."""
    if not path.is_dir():
        return path
    for stem in (FINAL_MODEL, BEST_MODEL):
        weights, _ = snapshot_paths(path, stem)
        if weights.is_file():
            return weights
    raise UserError(f"{path} holds no final-model.safetensors or best-model.safetensors; pass a run directory "
                    "that finished an eval, or one of its model-step-<n>.safetensors")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("snapshot", help="a <stem>.safetensors written by a run (final-model, best-model, ...), "
                                         "or a run directory (its final-model, else best-model)")
    parser.add_argument("--prompt", default="")
    parser.add_argument("--max-new-tokens", type=int, default=60)
    parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--chat", action="store_true",
                        help="ask a fine-tuned model (preset=sft): the prompt is a ChatML user turn, the answer stops "
                             "at the end of the assistant's turn, and only the answer is printed")
    args = parser.parse_args(argv)
    try:
        if args.max_new_tokens < 1 or args.temperature < 0 or args.top_k < 0:
            raise UserError(f"--max-new-tokens {args.max_new_tokens}, --temperature {args.temperature}, --top-k "
                            f"{args.top_k}: need at least 1 new token, a temperature >= 0 (0 = greedy) and top-k >= 0")
        model, tokenizer, _ = load_snapshot_model(snapshot_in(Path(args.snapshot)))
        if args.chat:
            if tokenizer.token_id(IM_END) is None:
                raise UserError(f"--chat needs a fine-tuned model: {args.snapshot}'s tokenizer has no chat markers; "
                                "fine-tune it first with preset=sft run.init_from=<this run>")
            ids, stop = encode_prompt(tokenizer, args.prompt), tokenizer.token_id(IM_END)
        else:
            ids, stop = tokenizer.encode(args.prompt) or [tokenizer.eos_id], tokenizer.eos_id
        window = model.context_window
        if len(ids) + args.max_new_tokens > window:
            raise UserError(f"a {len(ids)}-token prompt plus --max-new-tokens {args.max_new_tokens} exceeds the "
                            f"model's {window}-position context; ask for at most {max(window - len(ids), 0)} new "
                            "tokens or shorten the prompt")
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    generator = torch.Generator().manual_seed(args.seed)
    out = generate(model, [ids], args.max_new_tokens, stop_ids=[stop], temperature=args.temperature,
                   top_k=args.top_k, pad_id=tokenizer.eos_id, generator=generator)[0]
    # A chat answer alone; a plain continuation after its prompt (the stop token itself is never printed).
    print(tokenizer.decode(out.tokens if args.chat else [*ids, *out.tokens]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
