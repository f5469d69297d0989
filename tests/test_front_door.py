"""A quiet front door: the warnings of other libraries that say nothing true about the
user's model are silenced, exactly those; the first call does no load-time work."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import torch

from optimum_gemma3.compiler.cpu import CpuBackend
from optimum_gemma3.quiet import torch_treespec_deprecation_silenced
from tests.conftest import REPO
from tests.test_kernels import needs_kernels

SILENCED = ("It seems this is running on a CPU-only machine", "No major for neuron device")


def test_importing_the_package_prints_no_neuron_device_probe_but_keeps_other_warnings():
    code = "import warnings, optimum_gemma3; warnings.warn('a warning of the user')"
    result = subprocess.run(
        [sys.executable, "-W", "default", "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert not [text for text in SILENCED if text in result.stderr], result.stderr
    assert "a warning of the user" in result.stderr


def test_treespec_deprecation_is_silenced_and_nothing_else():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch_treespec_deprecation_silenced():
            warnings.warn(
                "`isinstance(treespec, LeafSpec)` is deprecated", FutureWarning, stacklevel=1
            )
            warnings.warn("another deprecation", FutureWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["another deprecation"]


# optimum-cli's own `main()`, as its console script runs it, with one more FutureWarning
# raised where the cpu backend loads a program: inside the context that drops the
# treespec one, so it shows that only that message is dropped.
CLI_WITH_ANOTHER_WARNING = """
import sys, warnings
import torch
load = torch._inductor.aoti_load_package
def load_and_warn(*args, **kwargs):
    warnings.warn("another deprecation, raised while loading", FutureWarning, stacklevel=1)
    return load(*args, **kwargs)
torch._inductor.aoti_load_package = load_and_warn
sys.argv = ["optimum-cli", "export", "neuron", *sys.argv[1:]]
from optimum.commands.optimum_cli import main
sys.exit(main())
"""


def test_cli_export_shows_progress_and_other_warnings_but_no_silenced_ones(
    tiny_checkpoints, tmp_path
):
    """One tiny export (test_cli's shapes: its programs come from the compile cache).

    optimum-neuron's device probe is left out: optimum-neuron replaces optimum's
    `optimum/commands/env.py`, which `optimum_cli.py` imports first, so the probe prints
    before any plugin can run (see optimum_gemma3/quiet.py). It must not print again.
    """
    from tests.test_cli import SHAPE_ARGS

    source = tiny_checkpoints("4b")
    args = ["--model", str(source), *SHAPE_ARGS, str(tmp_path / "out")]
    result = subprocess.run(
        [sys.executable, "-W", "default", "-c", CLI_WITH_ANOTHER_WARNING, *args],
        capture_output=True,
        text=True,
        timeout=1200,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    log = result.stderr
    assert "LeafSpec" not in log and "incorrect regex pattern" not in log, log
    assert all(log.count(text) <= 1 for text in SILENCED), log
    assert "another deprecation, raised while loading" in log, log
    assert "compile: 100%" in log and "Saved" in log, log


class Double(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * x


@needs_kernels  # the cpu backend loads its kernels with every program
def test_cpu_backend_loads_without_treespec_warnings_or_leftover_files(tmp_path, monkeypatch):
    """The loader unpacks a package under TMPDIR and removes it only when the program is
    destroyed (never, in a killed process): a loaded program leaves nothing there."""
    backend = CpuBackend()
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    monkeypatch.setenv("TMPDIR", str(temporary))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        backend.compile(Double(), (torch.ones(3),), tmp_path / "double.pt2")
        leftovers = set(temporary.iterdir())  # the compiler's own, not the load's
        program = backend.load(tmp_path / "double.pt2")
    assert set(temporary.iterdir()) == leftovers, "the load left files in TMPDIR"
    assert os.environ["TMPDIR"] == str(temporary)
    assert torch.equal(program(torch.ones(3)), torch.full((3,), 2.0))
    assert not [w for w in caught if "LeafSpec" in str(w.message)]


def test_the_first_generate_after_load_is_like_any_other(tiny_checkpoints, tmp_path):
    """Load warms every program up (so the first request is not slower), then zeroes the
    caches: nothing of the warm-up may change any result."""
    from optimum_gemma3 import Gemma3NeuronModelForCausalLM
    from tests.test_artifacts import SHAPE
    from tests.test_parity import left_padded_batch

    source = tiny_checkpoints("4b")
    config = Gemma3NeuronModelForCausalLM.get_neuron_config(source, instance_type="cpu", **SHAPE)
    folder = Gemma3NeuronModelForCausalLM.export(source, config).save_pretrained(tmp_path / "m")
    ids, mask = left_padded_batch(520)
    model = Gemma3NeuronModelForCausalLM.from_pretrained(folder)
    caches = model.runtime.engine.caches
    assert caches and not any(cache.any() for cache in caches.values())
    first = model.generate(ids, mask, max_new_tokens=8)
    model.generate(ids[:1], mask[:1], max_new_tokens=8)  # leaves other caches behind
    assert torch.equal(model.generate(ids, mask, max_new_tokens=8), first)
