"""V4 optimiser: Muon (hybrid Newton-Schulz) + AdamW in one Optimizer, grouping, LR schedule (spec section 8)."""
from dsv4.optim.groups import Assignment, assign_param_groups, build_optimizer, format_assignment
from dsv4.optim.muon import V4_NS_STEPS, Muon, hybrid_newton_schulz
from dsv4.optim.schedule import clip_grad_norm, lr_at, set_lr

__all__ = ["Muon", "hybrid_newton_schulz", "V4_NS_STEPS", "build_optimizer", "assign_param_groups", "Assignment",
           "format_assignment", "lr_at", "set_lr", "clip_grad_norm"]
