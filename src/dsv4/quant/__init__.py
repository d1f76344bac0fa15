"""Number formats of the official checkpoints (spec section 7): FP8 block weights and MXFP4 experts."""
