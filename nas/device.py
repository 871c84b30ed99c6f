"""Devices: a user's device string resolved to a torch.device, and the label a measurement's device is shown by."""

from __future__ import annotations

import torch

from space.errors import RepnasError


def resolve_device(device: str | torch.device | None) -> torch.device:
    """'auto' (CUDA when present), 'cpu', 'cuda', 'cuda:N', 'mps' or an int index (as text or int) -> torch.device.

    Raises RepnasError naming the value and the choices when it is no device, when CUDA is absent, or when the
    index is beyond the devices present.
    """
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(f"cuda:{device}" if str(device).isdigit() else device)
    except RuntimeError:
        raise RepnasError(f"device {device!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RepnasError(f"device {device!r}: CUDA is not available on this machine; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise RepnasError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif dev.type not in ("cpu", "mps"):
        raise RepnasError(f"device {device!r} is not supported; use auto, cpu, cuda or cuda:N")
    return dev


def device_label(info: dict) -> str:
    """A latency record's device (`nas.latency.device_info`) in one phrase: the GPU's name, or the CPU's name and
    the threads it was timed with ("CPU AMD EPYC 7B13, 1 thread", "..., 2 threads")."""
    if info.get("type") == "cuda":
        return str(info.get("name"))
    threads = info.get("threads")
    return f"CPU {info.get('name')}, {threads} thread{'' if threads == 1 else 's'}"
