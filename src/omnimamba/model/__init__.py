"""OmniMamba (paper section 3): one Mamba-2 backbone for understanding (MMU) and generation (T2I).

    config.py      OmniMambaConfig and the presets
    core.py        the model: vocabularies, the two tasks' sequences and losses
    embeddings.py  image-code embedding, caption embedder (null caption for guidance)
    generate.py    decoding with the recurrent cache, classifier-free guidance
    checkpoint.py  save_pretrained / from_pretrained / from_components
    report.py      parameters per module
"""

from .config import PRESETS, OmniMambaConfig, preset, shapes_config
from .core import OmniMamba
from .embeddings import CaptionEmbedder, ImageTokenEmbedding
from .generate import cfg_logits
from .report import parameter_report

__all__ = ["PRESETS", "CaptionEmbedder", "ImageTokenEmbedding", "OmniMamba", "OmniMambaConfig", "cfg_logits",
           "parameter_report", "preset", "shapes_config"]
