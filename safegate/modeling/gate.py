"""The safety attention gate of CASA and the pure logit math at the safety step.

`SafetyGate` pools the (stop-gradient) prompt states with one attention head whose query is a frozen
descriptor embedding, and returns the gate logit `x` with `v_s = sigmoid(x)`:

    K = sg(H) W_K,  V = sg(H) W_V,  q~ = q W_Q
    a = softmax_t(kappa q~ . K_t / sqrt(d_a) + log m_t),   c = sum_t a_t V_t,   x = w_o . LayerNorm(c) + b_o

`w_o`, `b_o` and `W_K` start at zero (a no-op gate, attention as the masked mean); `kappa = ATTENTION_SCALE`
(0.05) keeps Adam from saturating the softmax early. Why: `docs/design.md` ("The gate's initialisation").

The states (and the query) are first standardised per feature, `H <- (H - mu) * s` with the buffers
`input_mean` / `input_inv_std`; they are the identity (0 / 1) until `set_input_stats` fills them from training
prompts (`fit_gate`, `safegate.train`), so a freshly attached gate and a bundle saved without them behave as before.
Backbones differ in state scale by orders of magnitude (and a few features carry most of the norm); without the
standardisation the same learning rate saturates the attention on one backbone and barely moves it on another.

Example:
    >>> import torch
    >>> gate = SafetyGate(hidden_size=8, query=torch.zeros(8), attention_dim=4)
    >>> gate(torch.randn(2, 5, 8), torch.ones(2, 5)).sigmoid()
    tensor([0.5000, 0.5000], grad_fn=<SigmoidBackward0>)
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

ATTENTION_SCALE = 0.05


class SafetyGate(nn.Module):
    """Single-head attention pooling over prompt states, read out to one logit per row."""

    #: State entries a saved gate may lack (bundles from before they existed): they load as the identity.
    OPTIONAL_STATE = ("input_mean", "input_inv_std")

    def __init__(
        self,
        hidden_size: int,
        query: torch.Tensor,
        attention_dim: int = 256,
        aggregation: str = "attention",
        train_query: bool = False,
    ) -> None:
        super().__init__()
        self.aggregation = aggregation
        self.w_q = nn.Linear(hidden_size, attention_dim, bias=False)
        self.w_k = nn.Linear(hidden_size, attention_dim, bias=False)
        self.w_v = nn.Linear(hidden_size, attention_dim, bias=False)
        self.norm = nn.LayerNorm(attention_dim)
        self.out = nn.Linear(attention_dim, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        # keys start at zero, so attention starts as the masked mean over the prompt: pooled features differ across
        # prompts from the first step, and the softmax cannot start saturated on positions every prompt shares
        # (system prompt, template tokens), which would make the gate a constant that never learns.
        nn.init.zeros_(self.w_k.weight)
        query = query.detach().float().reshape(hidden_size).clone()
        # per-feature standardisation of the states, identity until `set_input_stats` (see the module docstring)
        self.register_buffer("input_mean", torch.zeros(hidden_size))
        self.register_buffer("input_inv_std", torch.ones(hidden_size))
        if train_query:
            self.query = nn.Parameter(query)
        else:
            self.register_buffer("query", query)

    @torch.no_grad()
    def set_input_stats(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Standardise the gate's input per feature with `mean` / `std` (each `(hidden,)`) from now on.

        Tiny stds are floored at 1 % of the mean std, so a near-constant feature is not blown up into noise.
        """
        mean = mean.detach().double().reshape(self.input_mean.shape)
        std = std.detach().double().reshape(self.input_inv_std.shape)
        if not (torch.isfinite(mean).all() and torch.isfinite(std).all()):
            raise ValueError("the gate's input statistics must be finite")
        std = std.clamp_min(max(1e-2 * float(std.mean()), 1e-12))
        self.input_mean.copy_(mean.to(self.input_mean))
        self.input_inv_std.copy_(std.reciprocal().to(self.input_inv_std))

    def has_input_stats(self) -> bool:
        """Whether `set_input_stats` (or a loaded state) has set a standardisation other than the identity."""
        return bool(self.input_mean.any() or (self.input_inv_std != 1).any())

    def is_fresh(self) -> bool:
        """Whether the gate is untrained: its read-out weight is still zero, so its logit is one constant."""
        return not bool(self.out.weight.any())

    @torch.no_grad()
    def set_output_bias(self, value: float) -> None:
        """Set the read-out bias `b_o` to `value` (a fresh gate's logit for every prompt)."""
        self.out.bias.fill_(value)

    def member_logits(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The gate logit as a one-member ensemble, `(B, 1)` (see `modeling.gate_ensemble`)."""
        return self(hidden, mask).unsqueeze(-1)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: object, **kwargs: object) -> None:
        # gates saved before the standardisation buffers existed load as the identity (their exact old behaviour)
        for name, fill in zip(self.OPTIONAL_STATE, (torch.zeros_like, torch.ones_like)):
            state_dict.setdefault(prefix + name, fill(getattr(self, name)))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Gate logit `x` (B,) from prompt states `hidden` (B, T, d) and prompt mask `mask` (B, T).

        The projections are linear, so `q~ . (W_K h_t) = (W_K^T q~) . h_t` and `sum_t a_t W_V h_t = W_V sum_t a_t h_t`:
        the gate costs O(T d) instead of O(T d d_a) with identical math, which matters for long audio/video prompts.
        The standardisation `h' = (h - mu) * s` folds in the same way (`sum_t a_t = 1`): the scores are
        `h . (s * k) - (mu * s) . k` and the pooled state is `(sum_t a_t h_t - mu) * s`, so no standardised copy of
        the states is ever built.
        """
        h = hidden.detach().to(self.w_k.weight.dtype)  # stop-gradient: nothing flows back into the prompt
        mean, inv_std = self.input_mean.to(h.dtype), self.input_inv_std.to(h.dtype)
        q = self.w_q((self.query.to(h.dtype) - mean) * inv_std)  # (d_a,)
        key_query = (q @ self.w_k.weight) * inv_std  # (d,) = s * W_K^T q~
        scale = ATTENTION_SCALE / math.sqrt(q.shape[-1])
        scores = (h @ key_query - mean @ key_query) * scale  # (b, t)
        valid = mask.to(device=h.device, dtype=torch.bool)
        if self.aggregation == "attention":
            weights = scores.masked_fill(~valid, float("-inf")).softmax(-1)
            pooled = (torch.bmm(weights.unsqueeze(1), h).squeeze(1) - mean) * inv_std  # (b, d)
            return self.out(self.norm(self.w_v(pooled))).squeeze(-1)
        # mean_sigmoid / max_sigmoid: per-position probabilities, scaled by w_o's first weight (0 at start).
        probs = torch.sigmoid(scores * self.out.weight[0, 0] + self.out.bias[0])
        if self.aggregation == "mean_sigmoid":
            v = (probs * valid).sum(-1) / valid.sum(-1).clamp(min=1)
        else:
            v = probs.masked_fill(~valid, 0.0).amax(-1)
        return torch.logit(v, eps=1e-6)


def gate_pair_logits(
    z_safe: torch.Tensor, z_unsafe: torch.Tensor, gate_logit: torch.Tensor, scaling: str = "log_additive"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale the safe/unsafe logits by the gate: `log_additive` (default) or `multiplicative`."""
    gate_logit = gate_logit.to(z_safe.dtype)
    if scaling == "log_additive":
        return z_safe + F.logsigmoid(-gate_logit), z_unsafe + F.logsigmoid(gate_logit)
    if bool((z_safe < 0).any() | (z_unsafe < 0).any()):
        warnings.warn(
            "scaling='multiplicative' met a negative safety logit: scaling it by v_s pushes the wrong way. "
            "Use scaling='log_additive' (the default).",
            stacklevel=2,
        )
    v = torch.sigmoid(gate_logit)
    return (1 - v) * z_safe, v * z_unsafe


def unsafe_probability(z_safe: torch.Tensor, z_unsafe: torch.Tensor) -> torch.Tensor:
    """p(unsafe) under a softmax over the (already gated) pair."""
    return torch.sigmoid(z_unsafe - z_safe)
