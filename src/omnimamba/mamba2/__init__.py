from .cache import Mamba2Cache
from .checkpoint import CheckpointError
from .config import PRESETS, Mamba2Config, preset
from .model import Mamba2LM

__all__ = ["Mamba2Cache", "Mamba2Config", "Mamba2LM", "CheckpointError", "PRESETS", "preset"]
