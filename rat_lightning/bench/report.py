"""The JSON every benchmark writes: what ran where (device, torch, Triton), then its results."""

from __future__ import annotations

import json
import os

import torch

# Dense (not sparse) bf16 tensor-core peaks, FLOP/s, by a substring of the device name: the SXM
# datasheets' 989 TFLOP/s for both (the H200 has the H100's arithmetic, with faster memory).
PEAK_BF16 = {"H100": 989e12, "H200": 989e12}


def peak_bf16_flops(device: torch.device | None = None) -> float:
    """The dense bf16 peak of ``device`` (the current CUDA device by default; 989e12 where unknown)."""
    cuda = torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda")
    name = torch.cuda.get_device_name(device) if cuda else ""
    return next((value for key, value in PEAK_BF16.items() if key in name), 989e12)


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
