"""Number formats of the official checkpoints (docs/spec.md section 7): FP8 block weights and MXFP4 experts."""
