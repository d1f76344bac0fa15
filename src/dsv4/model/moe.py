"""DeepSeekMoE as in V4 (docs/spec.md section 3; official model.py `Gate`, `Expert`, `MoE`).

Router scores s = f(x W_g^T) in fp32 with f in {sqrtsoftplus, sigmoid, softmax}. Learned layers select
top-k of s + b (b = `gate.bias`, a non-gradient balancing bias); hash layers take tid2eid[token].
Weights are the unbiased s of the chosen experts, normalised to sum 1 (not for softmax scores, as in the
official code), times routed_scaling_factor.
Experts: W2(silu(clamp(W1 x, max=L)) * clamp(W3 x, -L, L)); one shared expert is always added.
Routed experts are stored stacked ([E, ...]) but the state dict uses the official per-expert names
`experts.{e}.w1.weight`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dsv4.config import ModelConfig
from dsv4.model.precision import KeepFP32


def swiglu(
    x: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    w3: torch.Tensor,
    limit: float,
    weight: torch.Tensor | None = None,
    act: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """W2(silu(clamp(W1 x)) * clamp(W3 x)); a routed expert's weight [N] multiplies W2's input, where the
    official code applies it. A weight may also be any object with .linear(x) = x W^T (weights kept in a
    quantised format, dsv4.quant.execution). act(input) is applied to each product's input when given (the
    official FP8 activation quantisation, dsv4.quant.official_quant)."""
    if act is not None:
        x = act(x)
    gate = _linear(x, w1)
    up = _linear(x, w3)
    if limit > 0:
        gate, up = gate.clamp(max=limit), up.clamp(-limit, limit)
    h = F.silu(gate) * up
    if weight is not None:
        h = h * weight[:, None].to(h.dtype)
    return _linear(h if act is None else act(h), w2)


def _linear(x: torch.Tensor, w: Any) -> torch.Tensor:
    return F.linear(x, w) if isinstance(w, torch.Tensor) else w.linear(x)


class Expert(nn.Module):
    """A single SwiGLU expert (used as the shared expert)."""

    def __init__(self, dim: int, inter: int, limit: float) -> None:
        super().__init__()
        self.limit = limit
        self.w1 = nn.Linear(dim, inter, bias=False)
        self.w2 = nn.Linear(inter, dim, bias=False)
        self.w3 = nn.Linear(dim, inter, bias=False)
        self.act_transform: Callable[[torch.Tensor], torch.Tensor] | None = None  # see swiglu's act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return swiglu(x, self.w1.weight, self.w2.weight, self.w3.weight, self.limit, act=self.act_transform)


class Experts(nn.Module):
    """E routed experts, stacked: w1, w3 [E, I, d], w2 [E, d, I]."""

    def __init__(self, n: int, dim: int, inter: int, limit: float) -> None:
        super().__init__()
        self.n, self.limit = n, limit
        self.gather_experts = True  # decode gathers each token's experts (forward_static); False: grouped loop
        self.w1 = nn.Parameter(torch.empty(n, inter, dim))
        self.w2 = nn.Parameter(torch.empty(n, dim, inter))
        self.w3 = nn.Parameter(torch.empty(n, inter, dim))
        # weight_transform(w) -> the tensor the forward multiplies by (identity; dsv4.quant.qat sets a
        # fake quantiser with a straight-through gradient for FP4 quantisation-aware training)
        self.weight_transform: Callable[[torch.Tensor], torch.Tensor] | None = None
        self.act_transform: Callable[[torch.Tensor], torch.Tensor] | None = None  # see swiglu's act
        self.register_state_dict_post_hook(Experts._split_state)
        self.register_load_state_dict_pre_hook(Experts._stack_state)

    @staticmethod
    def _split_state(module: Experts, state_dict: dict[str, Any], prefix: str, local_metadata: dict) -> None:
        for name in ("w1", "w2", "w3"):
            stacked = state_dict.pop(prefix + name)
            for e in range(module.n):
                state_dict[f"{prefix}{e}.{name}.weight"] = stacked[e]

    @staticmethod
    def _stack_state(
        module: Experts,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict,
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        for name in ("w1", "w2", "w3"):
            keys = [f"{prefix}{e}.{name}.weight" for e in range(module.n)]
            if all(k in state_dict for k in keys):
                state_dict[prefix + name] = torch.stack([state_dict.pop(k) for k in keys])

    def weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(w1, w2, w3) as the forward uses them: the parameters, through weight_transform when it is set.
        (dsv4.quant.execution overrides it with stacks that stay quantised and dequantise the experts
        they are indexed by; `.full()` gives the whole stack.)"""
        ws = (self.w1, self.w2, self.w3)
        if self.weight_transform is None:
            return ws
        f = self.weight_transform
        return f(ws[0]), f(ws[1]), f(ws[2])

    def forward_reference(self, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Plain per-token loop over its k experts (test oracle); the sum in fp32, as every path."""
        w1, w2, w3 = self.weights()
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        for j in range(idx.shape[1]):
            for e in range(self.n):
                sel = (idx[:, j] == e).nonzero().squeeze(-1)
                if sel.numel():
                    y = swiglu(x[sel], w1[e], w2[e], w3[e], self.limit, weights[sel, j], self.act_transform)
                    out.index_add_(0, sel, y.float())
        return out

    def forward_static(self, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """The same sum with shapes that do not depend on the routing (decode: few tokens, torch.compile).
        Gathered: each (token, slot) multiplies its own expert, N k products of one row. Eager this copies
        the N k experts first, so it is used when N k <= E; under torch.compile the gather is fused into
        the products' loads and it always wins. Otherwise every expert runs on every token (E N products)
        and the routing weights, zero off the chosen experts, mix them."""
        n_tok, k = idx.shape
        e1, e2, e3 = self.weights()
        act = self.act_transform or (lambda t: t)
        x = act(x)
        if n_tok * k <= self.n or torch.compiler.is_compiling():
            w1, w2, w3 = e1[idx], e2[idx], e3[idx]  # [N, k, ., .]
            gate = torch.einsum("nd,nkid->nki", x, w1)
            up = torch.einsum("nd,nkid->nki", x, w3)
            if self.limit > 0:
                gate, up = gate.clamp(max=self.limit), up.clamp(-self.limit, self.limit)
            h = act(F.silu(gate) * up * weights[..., None].to(gate.dtype))
            return torch.einsum("nki,nkdi->nkd", h, w2).float().sum(1)
        dense = torch.zeros(n_tok, self.n, dtype=weights.dtype, device=x.device).scatter_add_(1, idx, weights)
        e1, e2, e3 = (w if isinstance(w, torch.Tensor) else w.full() for w in (e1, e2, e3))  # kept (quantised) stacks
        gate = torch.einsum("nd,eid->nei", x, e1)
        up = torch.einsum("nd,eid->nei", x, e3)
        if self.limit > 0:
            gate, up = gate.clamp(max=self.limit), up.clamp(-self.limit, self.limit)
        h = act(F.silu(gate) * up * dense[..., None].to(gate.dtype))
        return torch.einsum("nei,edi->ned", h, e2).float().sum(1)

    def forward(self, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [N, d], idx/weights [N, k] -> [N, d] in fp32 (the official code sums the experts' outputs in
        fp32; MoE.forward casts back). Tokens grouped by expert: one matmul per used expert; without
        gradients and with at most E tokens (decode), forward_static."""
        if x.shape[0] <= self.n and not torch.is_grad_enabled() and self.gather_experts:
            return self.forward_static(x, idx, weights)
        _n_tok, k = idx.shape
        flat = idx.flatten()
        order = flat.argsort(stable=True)
        counts = torch.bincount(flat, minlength=self.n).tolist()
        tok = order // k
        xs = x.index_select(0, tok)  # backward is index_add (cheaper than advanced-index scatter)
        ws = weights.flatten().index_select(0, order).to(x.dtype)
        outs, start = [], 0
        w1, w2, w3 = self.weights()
        for e, cnt in enumerate(counts):
            if cnt:
                xe, we = xs[start : start + cnt], ws[start : start + cnt]
                outs.append(swiglu(xe, w1[e], w2[e], w3[e], self.limit, we, self.act_transform))
            start += cnt
        ys = torch.cat(outs).float()
        return torch.zeros(x.shape, dtype=torch.float32, device=x.device).index_add_(0, tok, ys)


class Gate(KeepFP32):
    fp32_names = ("bias",)
    tid2eid: torch.Tensor  # buffer [vocab, k] (hash-routed layers)
    bias: torch.Tensor  # buffer [E] (learned-routing layers)

    def __init__(self, cfg: ModelConfig, hash_routed: bool) -> None:
        super().__init__()
        self.topk, self.n, self.func = cfg.num_experts_per_tok, cfg.n_routed_experts, cfg.scoring_func
        # the official rule: top-k weights are renormalised for sigmoid / sqrtsoftplus scores, never for softmax
        # (whose scores already sum to 1 over all experts); norm_topk_prob=False (V3-style configs) turns it off
        self.norm = cfg.norm_topk_prob and cfg.scoring_func != "softmax"
        self.scale, self.hash = cfg.routed_scaling_factor, hash_routed
        # V3 group-limited routing, V3.2 family only (V4 ignores the n_group / topk_group its config.json carries)
        self.groups, self.topk_groups = (cfg.n_group, cfg.topk_group) if cfg.is_v32 else (1, 1)
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))
        if hash_routed:
            self.register_buffer("tid2eid", torch.zeros(cfg.vocab_size, self.topk, dtype=torch.long))
            self.register_load_state_dict_pre_hook(Gate._check_hash_table)
        else:
            self.register_buffer("bias", torch.zeros(cfg.n_routed_experts, dtype=torch.float32))

    @staticmethod
    def _check_hash_table(module: Gate, state_dict: dict[str, Any], prefix: str, *_: Any) -> None:
        """A loaded tid2eid must name K distinct experts in [0, E) per token: the official indexed add counts a
        repeated expert once where a sum counts it twice, so such a table is refused rather than misread."""
        table = state_dict.get(prefix + "tid2eid")
        if table is None:
            return
        t = table.long()
        bad = (t < 0) | (t >= module.n)
        if bad.any():
            row = int(bad.any(-1).nonzero()[0])
            raise ValueError(f"{prefix}tid2eid: row {row} names expert ids outside [0, {module.n}): {t[row].tolist()}")
        srt = t.sort(-1).values
        rep = (srt[:, 1:] == srt[:, :-1]).any(-1)
        if rep.any():
            row = int(rep.nonzero()[0])
            raise ValueError(
                f"{prefix}tid2eid: row {row} repeats an expert ({t[row].tolist()}); a hash table needs "
                f"{t.shape[1]} distinct experts per token ({int(rep.sum())} rows repeat one)"
            )

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        logits = F.linear(x.float(), self.weight.float())
        if self.func == "sqrtsoftplus":
            return F.softplus(logits).sqrt()
        if self.func == "sigmoid":
            return logits.sigmoid()
        return logits.softmax(-1)

    def limit_groups(self, biased: torch.Tensor) -> torch.Tensor:
        """V3 group-limited routing (official V3.2 model.py `Gate`): experts form n_group equal groups, each
        scored by the sum of its two highest biased scores; only the topk_group best groups stay candidates
        (the others are set to -inf). Identity when n_group == 1."""
        if self.groups <= 1:
            return biased
        g = biased.unflatten(-1, (self.groups, -1))
        keep = g.topk(2, dim=-1).values.sum(-1).topk(self.topk_groups, dim=-1).indices
        off = torch.ones(g.shape[:-1], dtype=torch.bool, device=g.device).scatter_(-1, keep, False)
        return g.masked_fill(off[..., None], float("-inf")).flatten(-2)

    def forward(
        self, x: torch.Tensor, input_ids: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [N, d] -> (weights [N, k] fp32, expert ids [N, k], scores [N, E])."""
        s = self.scores(x)
        if self.hash:
            if input_ids is None:
                raise ValueError("hash-routed MoE layer needs input_ids")
            idx = self.tid2eid[input_ids.reshape(-1)].long()
        else:
            idx = torch.topk(self.limit_groups(s + self.bias), self.topk, dim=-1).indices
        w = s.gather(1, idx)
        if self.norm:
            w = w / (w.sum(-1, keepdim=True) + 1e-20)
        return w * self.scale, idx, s


class MoE(KeepFP32):
    fp32_names = ("load",)
    load: torch.Tensor  # buffer [E]: tokens routed to each expert since the last update_bias

    def __init__(self, cfg: ModelConfig, layer_id: int) -> None:
        super().__init__()
        self.n, self.k = cfg.n_routed_experts, cfg.num_experts_per_tok
        self.gate = Gate(cfg, hash_routed=layer_id < cfg.num_hash_layers)
        self.experts = Experts(cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size, cfg.swiglu_limit)
        self.shared_experts = (
            Expert(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts, cfg.swiglu_limit)
            if cfg.n_shared_experts
            else None
        )
        self.alpha = cfg.seq_aux_loss_alpha
        self.register_buffer("load", torch.zeros(cfg.n_routed_experts), persistent=False)

    def init_buffers(self) -> None:
        """The routing counts start at zero (after a meta-device build)."""
        self.load.zero_()

    def forward(
        self, x: torch.Tensor, input_ids: torch.Tensor | None = None, reference: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x [B,T,d] -> (y [B,T,d], sequence-wise balance loss (0-dim) or None)."""
        b, t, d = x.shape
        flat = x.reshape(-1, d)
        w, idx, s = self.gate(flat, input_ids)
        experts = self.experts.forward_reference if reference else self.experts
        y = experts(flat, idx, w)
        if self.shared_experts is not None:
            y = y + self.shared_experts(flat)
        if self.training:  # consumed by update_bias() after the optimiser step
            self.load += torch.bincount(idx.flatten(), minlength=self.n).to(self.load.dtype)
        aux = None
        if self.training and not self.gate.hash and self.alpha > 0:
            aux = self.balance_loss(idx.view(b, t, -1), s.view(b, t, -1))
        return y.to(x.dtype).view(b, t, d), aux  # routed (fp32) + shared, summed in fp32, then the model dtype

    def balance_loss(self, idx: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """L = alpha sum_i f_i P_i per sequence, f_i = E/(K T) #routed to i, P_i = mean_t s_it / sum_j s_jt."""
        b, t, _ = idx.shape
        f = torch.zeros(b, self.n, device=idx.device).scatter_add_(
            1, idx.flatten(1), torch.ones(b, t * self.k, device=idx.device)
        )
        f = f * self.n / (self.k * t)
        p = (s / s.sum(-1, keepdim=True)).mean(1)
        return self.alpha * (f * p).sum(-1).mean()

    @torch.no_grad()
    def update_bias(self, gamma: float) -> None:
        """Aux-loss-free balancing: b_i += gamma * sign(mean_load - load_i); resets the load counter."""
        if not self.gate.hash and self.load.sum() > 0:
            self.gate.bias += gamma * torch.sign(self.load.mean() - self.load)
        self.load.zero_()

    @torch.no_grad()
    def max_violation(self, load: torch.Tensor | None = None) -> float:
        """MaxVio = max_i load_i / mean_i load_i - 1."""
        load = self.load if load is None else load
        return (load.max() / load.mean().clamp_min(1e-9) - 1).item()
