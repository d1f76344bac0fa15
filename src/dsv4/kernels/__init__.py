"""Core ops, each as a plain reference and (where it pays) a fast path tested against it."""
