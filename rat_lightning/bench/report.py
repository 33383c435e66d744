"""The JSON every benchmark writes: what ran where (device, torch, Triton), then its results."""

from __future__ import annotations

import json
import os

import torch


def write_report(path: str, payload: dict) -> None:
    """Write ``{"device", "torch", "triton", **payload}`` as indented JSON to ``path`` (folders made)."""
    import triton

    cuda = torch.cuda.is_available()
    environment = {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "torch": torch.__version__,
        "triton": triton.__version__,
    }
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as handle:
        json.dump({**environment, **payload}, handle, indent=2)
