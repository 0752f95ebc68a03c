"""The machine the ops run on, as results and the format cache name it."""

from __future__ import annotations

import os
import platform

import torch


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux), else what `platform` reports."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def device_description(device: str | torch.device) -> str:
    """The device a result was measured on: the GPU's name, or the CPU's with its cores and torch threads."""
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name()
    return f"{cpu_name()} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"
