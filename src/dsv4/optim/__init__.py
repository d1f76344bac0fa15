"""V4 optimiser: Muon (hybrid Newton-Schulz) + AdamW in one Optimizer, grouping, LR schedule (docs/spec.md §8)."""

from dsv4.optim.groups import Assignment, assign_param_groups, build_optimizer, format_assignment
from dsv4.optim.muon import V4_NS_STEPS, Muon, hybrid_newton_schulz
from dsv4.optim.schedule import clip_grad_norm, lr_at, set_lr

__all__ = [
    "V4_NS_STEPS",
    "Assignment",
    "Muon",
    "assign_param_groups",
    "build_optimizer",
    "clip_grad_norm",
    "format_assignment",
    "hybrid_newton_schulz",
    "lr_at",
    "set_lr",
]
