"""dsv4: a readable, tested PyTorch implementation of DeepSeek-V4 sparse language models."""

from dsv4.config import ConfigError, ModelConfig

__version__ = "0.1.0"
__all__ = ["ConfigError", "ModelConfig", "Transformer", "__version__"]


def __getattr__(name):
    if name == "Transformer":
        from dsv4.model.transformer import Transformer

        return Transformer
    raise AttributeError(name)
