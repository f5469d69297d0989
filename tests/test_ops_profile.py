"""The ops profile in the export config, and what the compile-cache key covers.

Nothing here compiles: exports are stopped at their first compile-cache lookup.
"""

from __future__ import annotations

import json
import platform

import pytest
from torch._inductor import cpu_vec_isa

from optimum_gemma3 import Gemma3NeuronConfig, Gemma3NeuronModelForCausalLM
from optimum_gemma3.compiler import cache as compile_cache
from optimum_gemma3.compiler import export
from optimum_gemma3.compiler.cpu import CpuBackend
from optimum_gemma3.graphs import kernels
from optimum_gemma3.graphs.ops import PLAIN, OpsProfile
from tests.test_artifacts import SHAPE

EVERY_FLAG = OpsProfile(
    skinny_linear=True,
    decode_attention=True,
    onednn=True,
    bf16_products_in_fp32=True,
    gelu_as_sigmoid=True,
)


@pytest.mark.parametrize("profile", [PLAIN, EVERY_FLAG, OpsProfile(gelu_as_sigmoid=True)])
def test_profile_round_trips_through_neuron_config_json(tiny_checkpoints, profile):
    config = Gemma3NeuronModelForCausalLM.get_neuron_config(
        tiny_checkpoints("270m"), instance_type="cpu", **SHAPE
    )
    config.ops_profile = profile
    recorded = json.loads(json.dumps(config.to_dict()))
    expected_isa = kernels.REQUIRED_ISA if profile.uses_kernels else None
    assert recorded["ops_profile"] == {**vars(profile), "kernels_isa": expected_isa}
    assert Gemma3NeuronConfig.from_dict(recorded).ops_profile == profile


def test_a_profile_from_another_version_is_refused():
    with pytest.raises(ValueError, match=r"ops_profile has fields .* \['fast_softmax'\]"):
        OpsProfile.from_dict({**PLAIN.to_dict(), "fast_softmax": True})


def test_plain_profile_runs_anywhere_and_kernel_profile_needs_the_kernels(monkeypatch):
    monkeypatch.setattr(kernels, "load", lambda: False)
    monkeypatch.setenv("OPTIMUM_GEMMA3_DISABLE_KERNELS", "1")
    assert PLAIN.missing_on_host() is None
    assert OpsProfile(gelu_as_sigmoid=True, bf16_products_in_fp32=True).missing_on_host() is None
    missing = OpsProfile(decode_attention=True).missing_on_host()
    assert "C++ CPU kernels (which need avx2+fma)" in missing
    assert "OPTIMUM_GEMMA3_DISABLE_KERNELS is set" in missing


class StopAtFirstCompile(Exception):
    pass


@pytest.fixture
def export_key(tiny_checkpoints, monkeypatch):
    """The compile-cache key of an export's first program (the export stops there)."""

    def stop(key, *args):
        raise StopAtFirstCompile(key)

    monkeypatch.setattr(export, "fetch_cached", stop)
    source = tiny_checkpoints("270m")

    def key() -> str:
        model_class = Gemma3NeuronModelForCausalLM
        config = model_class.get_neuron_config(source, instance_type="cpu", **SHAPE)
        with pytest.raises(StopAtFirstCompile) as stopped:
            model_class.export(source, config)
        return stopped.value.args[0]

    return key


@pytest.fixture
def fresh_digest():
    """The source digest recomputed for the test, and again after it."""
    compile_cache.graph_source_digest.cache_clear()
    yield
    compile_cache.graph_source_digest.cache_clear()


def test_cache_key_changes_with_the_ops_profile(export_key, monkeypatch):
    """The exporter puts the profile its graphs are traced with in every program's key."""
    keys = set()
    for profile in (PLAIN, EVERY_FLAG, OpsProfile(gelu_as_sigmoid=True)):
        monkeypatch.setattr(export, "ops_profile_for", lambda target, p=profile: p)
        key = export_key()
        assert export_key() == key
        keys.add(key)
    assert len(keys) == 3


def test_cache_key_changes_with_the_program_isa(export_key, monkeypatch):
    """A program vectorized for AVX-512 is not served to an export on an AVX2 host
    (a compile cache shared by both, e.g. in a network home)."""
    keys = set()
    for isa in ("avx2", "avx512"):
        monkeypatch.setattr(CpuBackend, "program_isa", lambda self, isa=isa: isa)
        keys.add(export_key())
    assert len(keys) == 2


def test_cache_key_changes_with_a_graph_source(export_key, monkeypatch, tmp_path, fresh_digest):
    """Any edit to a file that decides the graph (here a stand-in for one of them) gives
    another key, with no version to bump."""
    sources = compile_cache.graph_sources()
    edited = tmp_path / "layers.py"
    edited.write_text("x = 1\n")
    monkeypatch.setattr(compile_cache, "graph_sources", lambda: [*sources, edited])
    before = export_key()
    edited.write_text("x = 2\n")
    assert export_key() == before  # hashed once per process
    compile_cache.graph_source_digest.cache_clear()
    assert export_key() != before


def test_graph_sources_cover_the_graphs_the_kernels_and_the_compilers(fresh_digest, monkeypatch):
    names = {f"{path.parent.name}/{path.name}" for path in compile_cache.graph_sources()}
    for name in [
        "graphs/layers.py",
        "graphs/decoder.py",
        "graphs/program.py",
        "graphs/ops.py",
        "kernels/skinny_linear.cpp",
        "kernels/row_products.h",
        "compiler/cpu.py",
    ]:
        assert name in names
    listed = []
    original = compile_cache.graph_sources
    monkeypatch.setattr(compile_cache, "graph_sources", lambda: listed.append(1) or original())
    for _ in range(3):
        compile_cache.program_key({}, {}, {})
    assert listed == [1]


def test_program_isa_is_checked_against_the_cpu_features(monkeypatch):
    """An AVX2-only host refuses AVX-512 programs and runs AVX2 ones, without compiling."""
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("x86 feature names")
    monkeypatch.setattr(cpu_vec_isa, "x86_isa_checker", lambda: ["avx2"])
    monkeypatch.setattr(cpu_vec_isa, "valid_vec_isa_list", None)  # no trial builds
    backend = CpuBackend()
    assert backend.runs_program_isa("avx2")
    assert not backend.runs_program_isa("avx512 avx512_vnni")
