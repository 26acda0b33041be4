"""GPU telemetry during a timed region: power, SM clock and utilisation from NVML (nvidia-ml-py).

A background thread reads the counters every `interval_s` while the region runs; each reading carries the
sampler's current `tag` (the timer sets it to the provider it is timing), and `summary(tag)` gives the means and
maxima of one provider's readings (of all, without a tag). Without a GPU or NVML nothing is read: None.
"""

from __future__ import annotations

import statistics
import threading
from typing import Callable

import torch

READINGS = ("power_w", "sm_clock_mhz", "util_pct")


def _nvml_reader(device: torch.device) -> Callable[[], dict] | None:
    """A function returning one reading of the GPU behind `device`, or None where NVML is unusable."""
    try:
        import pynvml

        pynvml.nvmlInit()
        props = torch.cuda.get_device_properties(device.index if device.index is not None else 0)
        # By PCI address: CUDA_VISIBLE_DEVICES renumbers the devices NVML counts.
        handle = pynvml.nvmlDeviceGetHandleByPciBusId(
            f"{props.pci_domain_id:08x}:{props.pci_bus_id:02x}:{props.pci_device_id:02x}.0")
    except Exception:  # noqa: BLE001 - telemetry is optional: no driver, no library, no permission
        return None

    def read() -> dict:
        return {"power_w": pynvml.nvmlDeviceGetPowerUsage(handle) / 1000.0,
                "sm_clock_mhz": float(pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_SM)),
                "util_pct": float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)}

    return read


class TelemetrySampler:
    """Context manager: `with TelemetrySampler(device) as tel: ...` then `tel.summary()`.

    `reader` replaces NVML (tests pass a fake one); it returns a dict with the READINGS keys.
    """

    def __init__(self, device, interval_s: float = 0.05, reader: Callable[[], dict] | None = None):
        device = torch.device(device)
        self.reader = reader if reader is not None else (_nvml_reader(device) if device.type == "cuda" else None)
        self.interval_s = interval_s
        self.samples: list[tuple[object, dict]] = []  # (tag, reading)
        self.tag = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _read(self) -> None:
        tag = self.tag  # read before the call: the timer may move on meanwhile
        try:
            self.samples.append((tag, self.reader()))
        except Exception:  # noqa: BLE001 - a failed reading is skipped, never fatal to a benchmark
            pass

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._read()

    def __enter__(self) -> "TelemetrySampler":
        if self.reader is not None:
            self._read()  # at least one reading, however short the region
            self._thread = threading.Thread(target=self._loop, name="fastdiff-telemetry", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()

    def summary(self, tag=None) -> dict | None:
        """{samples, power_w_mean, power_w_max, sm_clock_mhz_mean, ...} of the readings taken under `tag` (all
        readings when tag is None), or None when there are none."""
        samples = [s for t, s in self.samples if tag is None or t == tag]
        if not samples:
            return None
        out: dict = {"samples": len(samples)}
        for key in READINGS:
            values = [s[key] for s in samples if key in s]
            if values:
                out[f"{key}_mean"], out[f"{key}_max"] = round(statistics.fmean(values), 1), round(max(values), 1)
        return out
