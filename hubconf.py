"""torch.hub entry points: ``torch.hub.load("<owner>/franca", "franca_vitb14")``.

Each entry point (``weights=`` as in franca.models.hub) builds a model of the registry, franca.models.registry, where every
released file's URL, architecture and normalisation is recorded: ``franca.list_models(pretrained=True)`` names them.
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "src"))

from franca.models.hub import franca_vitb14, franca_vitg14, franca_vitl14  # noqa: E402

dependencies = ["torch", "safetensors"]

__all__ = ["franca_vitb14", "franca_vitg14", "franca_vitl14"]
