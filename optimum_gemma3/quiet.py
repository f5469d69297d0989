"""Exactly the warnings other libraries print on this package's paths that say nothing
true about the user's model, silenced by category and message; every other warning stays.

- torch's `FutureWarning: isinstance(treespec, LeafSpec) is deprecated`, raised from inside
  torch's own export and `.pt2` loading code (not ours to change), dozens of times per
  export: silenced while the `cpu` backend compiles and loads programs.
- optimum-neuron's device probe at its import on a host without a Neuron device: the
  "running on a CPU-only machine, so we override the platform target" warning and the
  "No major for neuron device" error log. Neither concerns the `cpu` target: silenced while
  this package imports optimum-neuron (on a Neuron host neither is raised). Not under
  `optimum-cli`: optimum-neuron replaces optimum's `optimum/commands/env.py`, which
  `optimum_cli.py` imports at its top, so the probe runs before any plugin is loaded.
(transformers' "incorrect regex pattern" warning had a cause in the converted 270M's
tokenizer, a no-op pre-tokenizer: `scripts/prepare_270m.py` does not write it, and
tests/test_real_model.py checks that loading the tokenizer warns of nothing.)
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator

TREESPEC_DEPRECATION = r".*isinstance\(treespec, LeafSpec\)"
CPU_ONLY_TARGET_WARNING = r"It seems this is running on a CPU-only machine"
NO_NEURON_DEVICE_LOG = "No major for neuron device"
NEURON_PROBE_LOGGER = "optimum.neuron.utils.system"


@contextlib.contextmanager
def torch_treespec_deprecation_silenced() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=TREESPEC_DEPRECATION, category=FutureWarning)
        yield


class _DropMessage(logging.Filter):
    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


@contextlib.contextmanager
def neuron_device_probe_silenced() -> Iterator[None]:
    probe_logger = logging.getLogger(NEURON_PROBE_LOGGER)
    drop = _DropMessage(NO_NEURON_DEVICE_LOG)
    probe_logger.addFilter(drop)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=CPU_ONLY_TARGET_WARNING, category=UserWarning)
            yield
    finally:
        probe_logger.removeFilter(drop)
