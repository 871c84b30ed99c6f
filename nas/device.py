"""Devices: a user's device string resolved to a torch.device, the label a measurement's device is shown by, a GPU's
lasting identity (UUID, PCI bus id) and the per-GPU lock that keeps training off a GPU while latency is timed there."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

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


def gpu_identity(device: torch.device) -> dict:
    """The CUDA device `device` names (no index: the current one) as a machine knows it for good: {"index" (torch's,
    in this process), "name", "uuid" ("GPU-..." as nvidia-smi and NVML print it), "pci_bus_id" ("00000000:65:00.0"),
    "visible_devices" (this process's CUDA_VISIBLE_DEVICES, None when unset)}. Indices change with
    CUDA_VISIBLE_DEVICES (a `--devices` worker's GPU is its cuda:0); the UUID and the PCI bus id do not. A field the
    installed torch does not report is None."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    props = torch.cuda.get_device_properties(index)
    uuid = getattr(props, "uuid", None)
    uuid = None if uuid is None else str(uuid)
    if uuid is not None and not uuid.startswith(("GPU-", "MIG-")):
        uuid = f"GPU-{uuid}"
    bus = getattr(props, "pci_bus_id", None)
    pci = None if bus is None else (f"{getattr(props, 'pci_domain_id', 0):08X}:{bus:02X}:"
                                    f"{getattr(props, 'pci_device_id', 0):02X}.0")
    return {"index": index, "name": props.name, "uuid": uuid, "pci_bus_id": pci,
            "visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}


class GpuLock:
    """Turns on one GPU between the processes of this user on this machine: a training step (`step`) and a latency
    measurement (`timing`) never overlap, so workers sharing a GPU (`--devices 0,0`) do not train while another
    times. Keyed by the GPU's UUID, which every process agrees on whatever its CUDA_VISIBLE_DEVICES.

    Two `nas.files.FileLock`s: `busy`, held by each training step and by a whole measurement, and `gate`, which a
    measurement holds from before it waits for `busy` and a step passes through before it takes `busy`; so a
    waiting measurement is next once the running step ends (a bare flock lets a training loop that re-takes it at
    once starve the waiter). A step costs two uncontended open/flock/close pairs (tens of microseconds).
    """

    def __init__(self, key: str):
        from nas.files import FileLock, host_lock_path

        self.busy = FileLock(host_lock_path(f"gpu-{key}"))
        self.gate = FileLock(host_lock_path(f"gpu-{key}-gate"))

    @contextmanager
    def step(self) -> Iterator[None]:
        """Held around one training step (forward, backward, optimiser step, and the step's last host sync)."""
        with self.gate:
            pass  # a measurement waiting for the GPU goes first
        with self.busy:
            yield

    @contextmanager
    def timing(self) -> Iterator[None]:
        """Held around a whole latency measurement: warm-up, graph capture, every timed pass."""
        with self.gate, self.busy:
            yield


class _NoLock:
    """`GpuLock`'s interface off CUDA: nothing to share, nothing held."""

    @contextmanager
    def step(self) -> Iterator[None]:
        yield

    timing = step


def gpu_lock(device: torch.device) -> GpuLock | _NoLock:
    """The `GpuLock` of the CUDA device `device` (keyed by its UUID, else its PCI bus id); a no-op lock for a CPU
    (or MPS) device."""
    if device.type != "cuda":
        return _NoLock()
    identity = gpu_identity(device)
    key = identity["uuid"] or identity["pci_bus_id"] or f"index{identity['index']}"
    return GpuLock(key)
