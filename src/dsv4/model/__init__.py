"""Single-device V4 model code: one file per concern (see docs/architecture.md)."""
