"""OmniMamba: unified multimodal understanding and generation on a Mamba-2 backbone."""

from .mamba2 import Mamba2Cache, Mamba2Config, Mamba2LM

__version__ = "0.1.0"

__all__ = ["Mamba2Cache", "Mamba2Config", "Mamba2LM", "__version__"]
