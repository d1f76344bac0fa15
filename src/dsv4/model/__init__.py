"""Single-device model code (V4 and the V3.2 family): one file per concern (see docs/architecture.md)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dsv4.config import ModelConfig
    from dsv4.model.transformer import Transformer


def build_model(cfg: ModelConfig) -> Transformer:
    """The model of cfg's family: Transformer (deepseek_v4) or V32Transformer (deepseek_v32)."""
    if cfg.is_v32:
        from dsv4.model.v32 import V32Transformer

        return V32Transformer(cfg)
    from dsv4.model.transformer import Transformer

    return Transformer(cfg)
