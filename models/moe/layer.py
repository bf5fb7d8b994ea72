"""Mixture-of-Experts drop-in for GPT-2's MLP: [B, T, d] in, [B, T, d] out, router aux stats on `last_aux`."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from transformers.activations import ACT2FN

from models.moe.dispatch import expert_ffn
from models.moe.losses import expert_fraction, load_balancing_loss, z_loss
from models.moe.router import NoisyTopKRouter

GELU_NEW = ACT2FN["gelu_new"]  # GPT-2's activation; stateless, so one instance can be shared


class MoEFeedForward(nn.Module):
    def __init__(self, d_model: int, d_ff: int, num_experts: int = 8, topk: int = 1, noise_std: float = 0.0,
                 activation=GELU_NEW, dropout: float = 0.0):
        super().__init__()
        self.num_experts = num_experts
        self.topk = topk
        self.router = NoisyTopKRouter(d_model, num_experts, topk, noise_std)
        # Stacked [E, in, out] (Conv1D layout) so dispatch can hand each expert a contiguous matrix.
        self.w_fc = nn.Parameter(torch.empty(num_experts, d_model, d_ff))
        self.b_fc = nn.Parameter(torch.zeros(num_experts, d_ff))
        self.w_proj = nn.Parameter(torch.empty(num_experts, d_ff, d_model))
        self.b_proj = nn.Parameter(torch.zeros(num_experts, d_model))
        nn.init.normal_(self.w_fc, std=0.02)  # GPT-2's initializer_range
        nn.init.normal_(self.w_proj, std=0.02)
        self.activation = activation
        self.dropout = nn.Dropout(dropout)
        self.last_aux: dict[str, Tensor] = {}

    @classmethod
    def from_gpt2_mlp(cls, mlp, num_experts: int, topk: int, noise_std: float, perturbation: float,
                      generator: torch.Generator | None = None) -> MoEFeedForward:
        """Warm start: every expert is the dense MLP plus small Gaussian noise.

        Noise std is `perturbation` times each tensor's own std, so the relative size of the nudge is the
        same for weights and biases; without it the experts stay identical and receive identical updates
        whenever the router sends them the same kind of tokens.
        """
        w_fc, b_fc = mlp.c_fc.weight, mlp.c_fc.bias  # Conv1D: weight already [in, out]
        w_proj, b_proj = mlp.c_proj.weight, mlp.c_proj.bias
        d_model, d_ff = w_fc.shape
        layer = cls(d_model, d_ff, num_experts, topk, noise_std, activation=mlp.act, dropout=mlp.dropout.p)
        layer.to(device=w_fc.device, dtype=w_fc.dtype)
        with torch.no_grad():
            for dst, src in ((layer.w_fc, w_fc), (layer.b_fc, b_fc), (layer.w_proj, w_proj), (layer.b_proj, b_proj)):
                dst.copy_(src.detach().unsqueeze(0).expand_as(dst))
                if perturbation > 0:
                    dst.add_(_randn(dst.shape, generator, dst) * (perturbation * src.detach().float().std()))
            # Small, bias-free router: near-uniform probabilities at the start, so early routing is driven by
            # the tokens rather than by an arbitrary initial preference.
            layer.router.weight.copy_(_randn(layer.router.weight.shape, generator, layer.router.weight) * 0.02)
        return layer

    def forward(self, hidden: Tensor) -> Tensor:
        shape = hidden.shape
        x = hidden.reshape(-1, shape[-1])
        route = self.router(x)
        # Looked up at call time by its name in this module, so a benchmark can swap in another dispatch.
        out = expert_ffn(x, route.expert_index, route.gates, self.w_fc, self.b_fc, self.w_proj, self.b_proj,
                         self.activation)
        out = self.dropout(out)
        with torch.no_grad():
            log_probs = route.logits.log_softmax(dim=-1)
            entropy = -(route.probs * log_probs).sum(dim=-1).mean()
            fraction = expert_fraction(route.expert_index, self.num_experts)
            prob_mean = route.probs.mean(dim=0)
        self.last_aux = {
            "lb_loss": load_balancing_loss(route.routing_probs, route.expert_index, self.num_experts),
            "z_loss": z_loss(route.logits),
            "fraction": fraction,
            "entropy": entropy,
            "prob_mean": prob_mean,
        }
        return out.view(shape[:-1] + out.shape[-1:])

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, topk={self.topk}, noise_std={self.router.noise_std}"


def _randn(shape, generator: torch.Generator | None, like: Tensor) -> Tensor:
    # Draw on the generator's device (randn insists), then move: the same seed gives the same experts anywhere.
    device = generator.device if generator is not None else like.device
    return torch.randn(shape, generator=generator, device=device, dtype=torch.float32).to(like)
