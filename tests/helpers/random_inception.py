"""torch-fidelity's FID InceptionV3 with random weights (the real architecture), written as a local weights file:
what the FID tests and the FID run on Shapes use, since the real weights cannot be downloaded here.

Convolutions are drawn with He initialisation (variance 2 / fan-in) so that activations keep their scale through
the network's depth; with PyTorch's default initialisation they shrink layer by layer and every image ends with
the same (near-zero) features, which makes every FID zero.

    python tests/helpers/random_inception.py OUT.pth
"""

import sys
from unittest import mock

import torch
from torch import nn


def random_inception_state(seed: int = 0) -> dict:
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    torch.manual_seed(seed)
    with mock.patch("torch.load", lambda *a, **k: {}), \
            mock.patch.object(FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None):
        net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path="unused")
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    return net.state_dict()


if __name__ == "__main__":
    torch.save(random_inception_state(), sys.argv[1])
