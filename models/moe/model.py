"""GPT-2 with routed Mixture-of-Experts FFNs in its last blocks (the MoE-emergence family).

The dense GPT-2 is built first (pretrained or random init), then each block in `moe_layers` swaps its
MLP for an MoEFeedForward whose experts start as copies of that MLP, so training starts from the
dense model's function. Aux losses are averaged over MoE layers:
total = lm + lb_coef * lb + z_coef * z.
"""

from __future__ import annotations

import torch
from transformers.models.gpt2.modeling_gpt2 import GPT2MLP

from models.gpt2.model import DenseGPT2, load_gpt2
from models.moe import stats
from models.moe.callbacks import CollapseDetector, DomainSpecialisation, RouterNoiseSchedule
from models.moe.layer import MoEFeedForward
from models.output import ModelOutput, lm_output


class MoEGPT2(DenseGPT2):
    family = "moe"
    # run.init_from may start it from a dense GPT-2 run of the same sizes (sparse upcycling), or an MoE run.
    initial_families = ("moe", "dense")

    def __init__(self, hf, model_cfg):
        super().__init__(hf, document_masking=model_cfg.document_masking)
        model_cfg.check_layout(hf.config.n_layer)  # a pretrained model's depth is only known now
        self.moe_layers = list(model_cfg.moe_layers)
        self.num_experts, self.topk = model_cfg.num_experts, model_cfg.topk
        self.lb_coef, self.z_coef = model_cfg.lb_coef, model_cfg.z_coef
        self.model_cfg = model_cfg
        for i in self.moe_layers:
            block = hf.transformer.h[i]
            block.mlp = MoEFeedForward.from_gpt2_mlp(block.mlp, num_experts=self.num_experts, topk=self.topk,
                                                     noise_std=model_cfg.noise_std,
                                                     perturbation=model_cfg.expert_perturbation)

    def load_initial_state(self, state: dict[str, torch.Tensor], architecture: dict) -> None:
        """run.init_from's weights. A dense GPT-2's (sparse upcycling): the shared GPT-2 base loads as it is,
        and each MoE block's experts start as copies of that block's trained MLP plus model.expert_perturbation,
        exactly as they start from a pretrained GPT-2 at build. The router starts fresh."""
        if architecture["family"] != "dense":
            self.load_state_dict(state, strict=True)
            return
        mlp_prefixes = tuple(f"hf.transformer.h.{i}.mlp." for i in self.moe_layers)
        base = {k: v for k, v in state.items() if not k.startswith(mlp_prefixes)}
        missing, unexpected = self.load_state_dict(base, strict=False)
        left = [k for k in missing if not k.startswith(mlp_prefixes)]
        if left or unexpected:
            raise ValueError(f"dense weights do not fit this MoE model: missing {left[:3]}, unexpected "
                             f"{list(unexpected)[:3]}")
        for i, prefix in zip(self.moe_layers, mlp_prefixes, strict=True):
            mlp = GPT2MLP(4 * self.hf.config.n_embd if self.hf.config.n_inner is None else self.hf.config.n_inner,
                          self.hf.config)
            mlp.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
            layer = self.hf.transformer.h[i].mlp
            upcycled = MoEFeedForward.from_gpt2_mlp(mlp, num_experts=self.num_experts, topk=self.topk,
                                                    noise_std=layer.router.noise_std,
                                                    perturbation=self.model_cfg.expert_perturbation)
            layer.load_state_dict(upcycled.state_dict())

    def moe_modules(self) -> list[MoEFeedForward]:
        return [self.hf.transformer.h[i].mlp for i in self.moe_layers]

    def set_router_noise(self, std: float) -> None:
        for layer in self.moe_modules():
            layer.router.noise_std = std

    def forward(self, input_ids: torch.Tensor, document_ids: torch.Tensor | None = None,
                labels: torch.Tensor | None = None) -> ModelOutput:
        out = self.scored_forward(input_ids, document_ids, labels)
        auxes = [layer.last_aux for layer in self.moe_modules()]
        lb = torch.stack([a["lb_loss"] for a in auxes]).mean()
        z = torch.stack([a["z_loss"] for a in auxes]).mean()
        routing: dict[str, torch.Tensor] = {}
        for i, aux in zip(self.moe_layers, auxes, strict=True):
            routing[stats.fraction(i)] = aux["fraction"]
            routing[stats.entropy(i)] = aux["entropy"]
        routing[stats.ENTROPY_MEAN] = torch.stack([a["entropy"] for a in auxes]).mean()
        metrics = {stats.LB_LOSS: lb.detach(), stats.Z_LOSS: z.detach(),
                   stats.ROUTER_NOISE_STD: torch.tensor(self.moe_modules()[0].router.noise_std, device=lb.device)}
        return lm_output(out.loss, aux_losses={"lb": self.lb_coef * lb, "z": self.z_coef * z},
                         metrics=metrics, routing=routing)

    def architecture(self) -> dict:
        return {**super().architecture(), "family": self.family, "moe_layers": self.moe_layers,
                "num_experts": self.num_experts, "topk": self.topk}

    def no_weight_decay(self) -> set[str]:
        # Stacked expert biases are 2-D ([experts, features]) but are still biases.
        return {name for name, _ in self.named_parameters() if name.endswith((".b_fc", ".b_proj"))}

    def callbacks(self, cfg) -> list:
        m = self.model_cfg
        found = [RouterNoiseSchedule(self, m.noise_std, m.noise_anneal_fraction, cfg.train.max_steps),
                 DomainSpecialisation(self.moe_layers)]
        if m.collapse_stop:
            found.append(CollapseDetector(self.moe_layers, m.collapse_check_every, m.collapse_threshold,
                                          m.collapse_patience, topk=m.topk))
        return found


def build(model_cfg, vocab_size: int, eos_id: int) -> MoEGPT2:
    hf = load_gpt2(model_cfg, vocab_size, eos_id)
    hf.loss_type = "ForCausalLM"
    return MoEGPT2(hf, model_cfg)
