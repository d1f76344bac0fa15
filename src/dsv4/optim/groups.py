"""Which optimiser updates which V4 parameter (docs/spec.md section 8; V4 report, optimiser paragraph).

Rules, first match wins (`assign_param_groups` returns name -> Assignment for tests and docs):
  embedding tables (`embed.weight`, any nn.Embedding)  AdamW, wd       (sparse rows; spec: AdamW)
  LM head (`head.weight`)                               AdamW, wd       (spec: AdamW)
  mHC static biases / gates (`hc_*_base`, `hc_*_scale`) AdamW, wd 0     (spec: AdamW; 1-D)
  mHC maps (`hc_*_fn`: [(2+hc)hc, hc d], [hc, hc d])    Muon by default (hc_fn="muon")
  any 1-D parameter (RMSNorm weights, attn_sink)        AdamW, wd 0
  compressor `ape` [m, c] (a position bias)             AdamW, wd 0
  every other matrix (wq_a, wq_b, wkv, wo_a/b, gate.weight, experts w1/w2/w3 [E, out, in],
    shared experts, compressor/indexer projections, MTP e_proj/h_proj)   Muon, wd
AdamW uses betas (0.9, 0.95); wd is 0.1 on matrices, 0 on 1-D parameters and biases (the spec's
"wd 0.1" for the AdamW set is applied to its matrices only: decaying norm gains / sinks / gate biases
towards 0 is not wanted).

Decision on hc_*_fn: the V4 report keeps AdamW only for "the static biases and gating factors of mHC"
(b and alpha in pre = sigmoid(alpha x'phi + b)); the projections phi (`hc_*_fn`) are ordinary dense
matrices and so take Muon like every other matrix. `hc_fn="adamw"` moves them to AdamW (with wd).

Decision on wo_a: the grouped output projection stores o_groups independent [o_lora_rank, h c / g]
maps stacked along the rows (the operator is block-diagonal), so its Muon group has blocks=o_groups
and each block is orthogonalised and scaled on its own, as the experts are.

`matrices="adamw"` (TrainConfig.optimizer; the Muon vs AdamW ablation) gives every Muon matrix above to AdamW
with wd instead, so the whole model trains with AdamW at the same learning rate and schedule.

`lr_mult` maps name prefixes to lr multipliers (longest prefix wins; e.g. {"engram.": 5.0}); each
param group stores 'lr_mult' and dsv4.optim.schedule.set_lr sets lr = base lr * lr_mult.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from dsv4.optim.muon import Muon


@dataclass(frozen=True)
class Assignment:
    algorithm: str  # "muon" | "adamw"
    weight_decay: float
    lr_mult: float
    blocks: int
    reason: str


def _lr_mult(name: str, lr_mult: dict[str, float] | None) -> float:
    best, mult = -1, 1.0
    for prefix, m in (lr_mult or {}).items():
        if name.startswith(prefix) and len(prefix) > best:
            best, mult = len(prefix), float(m)
    return mult


def _row_blocks(model: nn.Module) -> dict[str, int]:
    """Parameters whose rows hold several independent matrices: Attention.wo_a (o_groups blocks)."""
    from dsv4.model.attention import Attention

    out = {}
    for mname, mod in model.named_modules():
        if isinstance(mod, Attention) and mod.groups > 1:
            out[f"{mname}.wo_a.weight" if mname else "wo_a.weight"] = mod.groups
    return out


def assign_param_groups(
    model: nn.Module,
    weight_decay: float = 0.1,
    lr_mult: dict[str, float] | None = None,
    hc_fn: str = "muon",
    matrices: str = "muon",
) -> dict[str, Assignment]:
    """name -> Assignment for every trainable parameter of `model` (in named_parameters order)."""
    for key, val in (("hc_fn", hc_fn), ("matrices", matrices)):
        if val not in ("muon", "adamw"):
            raise ValueError(f"{key} must be 'muon' or 'adamw', got {val!r}")
    embeddings = {f"{m}.weight" if m else "weight" for m, mod in model.named_modules() if isinstance(mod, nn.Embedding)}
    blocks = _row_blocks(model)
    out: dict[str, Assignment] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        leaf = name.rsplit(".", 1)[-1]
        mult = _lr_mult(name, lr_mult)

        def adamw(decay: bool, reason: str, mult: float = mult) -> Assignment:
            return Assignment("adamw", weight_decay if decay else 0.0, mult, 1, reason)

        if name in embeddings or name == "embed.weight":
            a = adamw(True, "embedding")
        elif name == "head.weight":
            a = adamw(True, "LM head")
        elif leaf.startswith("hc_") and leaf.endswith("_fn"):
            a = (
                Assignment("muon", weight_decay, mult, 1, "mHC map (hc_fn='muon')")
                if hc_fn == "muon"
                else adamw(True, "mHC map (hc_fn='adamw')")
            )
        elif leaf.startswith("hc_"):
            a = adamw(False, "mHC static bias / gate")
        elif p.ndim < 2:
            a = adamw(False, "1-D (norm weight, sink, bias)")
        elif leaf == "ape":
            a = adamw(False, "compressor position bias")
        else:
            a = Assignment("muon", weight_decay, mult, blocks.get(name, 1), "matrix")
        if a.algorithm == "muon" and matrices == "adamw":
            a = adamw(True, f"{a.reason} (matrices='adamw')")
        out[name] = a
    return out


def build_optimizer(
    model: nn.Module,
    lr: float,
    weight_decay: float = 0.1,
    lr_mult: dict[str, float] | None = None,
    hc_fn: str = "muon",
    matrices: str = "muon",
    **hyper: Any,
) -> Muon:
    """One Optimizer for the whole model: Muon groups and AdamW groups (see module docstring).

    Groups are keyed by (algorithm, weight_decay, lr_mult, blocks); each has 'name', 'lr_mult' and
    'param_names'. Initial group lr = lr * lr_mult. hyper: Muon's other defaults (momentum, nesterov,
    update_scale, ns_bf16, betas, eps).
    """
    plan = assign_param_groups(model, weight_decay, lr_mult, hc_fn, matrices)
    params = dict(model.named_parameters())
    groups: dict[tuple, dict] = {}
    for name, a in plan.items():
        key = (a.algorithm, a.weight_decay, a.lr_mult, a.blocks)
        if key not in groups:
            label = a.algorithm if a.algorithm == "muon" else f"adamw/{'decay' if a.weight_decay else 'no_decay'}"
            if a.blocks > 1:
                label += f"/blocks={a.blocks}"
            if a.lr_mult != 1.0:
                label += f"/lr_x{a.lr_mult:g}"
            groups[key] = dict(
                params=[],
                name=label,
                algorithm=a.algorithm,
                weight_decay=a.weight_decay,
                lr=lr * a.lr_mult,
                lr_mult=a.lr_mult,
                blocks=a.blocks,
            )
        groups[key]["params"].append((name, params[name]))
    return Muon(list(groups.values()), lr=lr, weight_decay=weight_decay, **hyper)


def format_assignment(plan: dict[str, Assignment]) -> str:
    """A plain-text table of an assignment (for docs / logs)."""
    w = max((len(n) for n in plan), default=4)
    lines = [f"{'parameter':<{w}}  algo   wd     lr_x  blocks  reason"]
    for n, a in plan.items():
        lines.append(f"{n:<{w}}  {a.algorithm:<5}  {a.weight_decay:<5g}  {a.lr_mult:<4g}  {a.blocks:<6}  {a.reason}")
    return "\n".join(lines)
