"""Export to an artifact folder on the cpu backend, save, reload, and every refusal."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch

from optimum_gemma3 import Gemma3NeuronConfig, Gemma3NeuronModelForCausalLM
from optimum_gemma3.artifact.files import ArtifactError
from optimum_gemma3.compiler.cpu import CpuBackend
from optimum_gemma3.compiler.neuron import NeuronSdkMissingError
from optimum_gemma3.graphs.ops import OpsProfile
from tests.test_parity import NEW_TOKENS, hf_greedy, left_padded_batch
from tests.tiny_models import load_reference, save_random_checkpoint

REPO = Path(__file__).resolve().parents[1]
LAYER_TYPES = ("sliding_attention", "full_attention")
SHAPE = dict(batch_size=3, sequence_length=128, context_encoding_buckets=[16, 32])
ARTIFACT_FILES = {
    "config.json",
    "neuron_config.json",
    "generation_config.json",
    "model.safetensors",
    # Per pass one program per layer type (6 layers, alternating); prefill's last layer its own.
    *(f"compiled/prefill-{part}.pt2" for part in (*LAYER_TYPES, "last")),
    *(f"compiled/decode-{part}.pt2" for part in LAYER_TYPES),
}


@pytest.fixture(scope="session")
def exported(tiny_checkpoints, tmp_path_factory):
    """The 4b-shaped tiny model compiled once for the session, saved to a folder."""
    source = tiny_checkpoints("4b")
    model = Gemma3NeuronModelForCausalLM.export(
        source, Gemma3NeuronModelForCausalLM.get_neuron_config(source, instance_type="cpu", **SHAPE)
    )
    folder = model.save_pretrained(tmp_path_factory.mktemp("artifacts") / "tiny-4b")
    return source, model, folder


def run_in_new_process(code: str, timeout: int = 300) -> str:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.strip().splitlines()[-1]


def test_exported_model_generates_transformers_tokens_before_and_after_reload(exported):
    source, model, folder = exported
    ids, mask = left_padded_batch(520)  # prompts of 5, 23, 14 tokens: buckets 16 and 32
    expected = hf_greedy(load_reference(source), ids, mask)
    assert torch.equal(model.generate(ids, mask, max_new_tokens=NEW_TOKENS), expected)

    reloaded = run_in_new_process(
        "import json, torch\n"
        "from optimum_gemma3 import Gemma3NeuronModelForCausalLM as M\n"
        "from tests.test_parity import left_padded_batch\n"
        f"m = M.from_pretrained({str(folder)!r})\n"
        "ids, mask = left_padded_batch(520)\n"
        f"print(json.dumps(m.generate(ids, mask, max_new_tokens={NEW_TOKENS}).tolist()))\n"
    )
    assert json.loads(reloaded) == expected.tolist()


def test_artifact_folder_layout(exported):
    _, _, folder = exported
    names = {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}
    assert ARTIFACT_FILES <= names
    recorded = json.loads((folder / "neuron_config.json").read_text())
    assert recorded["torch_version"] == torch.__version__
    assert recorded["compiler"] == "torch-aotinductor"
    programs = {n for n in names if n.startswith("compiled/")}
    assert set(recorded["artifact_files"]) == names - {"neuron_config.json"}  # the manifest
    assert recorded["artifact_files"]["model.safetensors"] is None  # checked by safetensors
    # Programs hold no weights: AOTInductor packages hold code and metadata only.
    for name in programs:
        with zipfile.ZipFile(folder / name) as archive:
            entries = archive.namelist()
        assert any(entry.endswith(".so") for entry in entries)
        assert not [e for e in entries if "weights" in e or "constants" in e], entries


def program_buffer_shapes(program: Path) -> set[tuple[int, ...]]:
    """The tensor shapes an AOTInductor program's wrapper code declares (its `int_array`s)."""
    with zipfile.ZipFile(program) as archive:
        (wrapper,) = [n for n in archive.namelist() if n.endswith(".wrapper.cpp")]
        source = archive.read(wrapper).decode()
    arrays = re.findall(r"int64_t int_array_\d+\[\] = \{([^}]*)\}", source)
    return {
        tuple(int(size.strip().rstrip("L")) for size in a.split(",") if size.strip())
        for a in arrays
    }


def test_decode_program_never_copies_a_whole_cache(exported):
    """A decode step writes one slot per row into the caches, in place. A scatter-style
    update made Inductor copy each cache whole and back on every step (about a third of
    the 270M's fp32 batch-4 step); such a copy needs a cache-shaped buffer."""
    _, model, folder = exported
    caches = {tuple(t.shape) for t in model.runtime.engine.caches.values()}
    batch, kv_heads, _, head_dim = next(iter(caches))
    for part in LAYER_TYPES:
        shapes = program_buffer_shapes(folder / f"compiled/decode-{part}.pt2")
        assert (batch, kv_heads, 1, head_dim) in shapes  # the new keys: the parsing sees shapes
        assert not caches & shapes


def test_cpu_programs_end_at_the_final_norm_and_the_runtime_runs_the_head(exported):
    """One-rank `cpu` programs return final-normed hidden states; the runtime's head turns
    them into logits, in full or near the max only. Elsewhere the head stays in the
    programs, and folders written before the field existed keep theirs."""
    source, model, folder = exported
    runtime = model.runtime
    assert model.neuron_config.head_on_host and runtime.head is not None
    ids, mask = torch.tensor([[0, 0, 7, 8, 9]]), torch.tensor([[0, 0, 1, 1, 1]])
    with torch.inference_mode():
        step = runtime.prefill(ids, mask)
        hidden = runtime.engine.decode(torch.zeros(3, 1, dtype=torch.long), torch.zeros(3).long())
    assert hidden.shape == (3, model.config.hidden_size)
    logits = step.full()
    assert logits.shape == (1, model.config.vocab_size)
    near, floor = step.near_top(1)
    assert torch.equal(near.argmax(-1), logits.argmax(-1)) and (logits < floor).any()

    sharded = Gemma3NeuronModelForCausalLM.get_neuron_config(
        source, instance_type="cpu", tensor_parallel_size=2, **SHAPE
    )
    assert not sharded.head_on_host
    recorded = json.loads((folder / "neuron_config.json").read_text())
    assert recorded["layer_programs"]
    del recorded["head_on_host"], recorded["layer_programs"]
    earlier = Gemma3NeuronConfig.from_dict(recorded)  # whole-stack programs, head inside
    assert not earlier.head_on_host and not earlier.layer_programs


def test_second_export_of_same_shape_skips_compilation(exported, tmp_path, monkeypatch, caplog):
    """Other weights, same architecture and shapes: every program comes from the cache."""
    other = save_random_checkpoint("4b", tmp_path / "finetune")  # same name: same shape
    from safetensors.torch import load_file, save_file

    tensors = {k: v * 1.5 for k, v in load_file(other / "model.safetensors").items()}
    save_file(tensors, other / "model.safetensors", metadata={"format": "pt"})

    def no_compile(*args, **kwargs):
        raise AssertionError("compiled although the compile cache holds this shape")

    monkeypatch.setattr(CpuBackend, "compile", no_compile)
    caplog.set_level(logging.INFO, logger="optimum_gemma3")
    config = Gemma3NeuronModelForCausalLM.get_neuron_config(other, instance_type="cpu", **SHAPE)
    model = Gemma3NeuronModelForCausalLM.export(other, config)
    programs = [name for name in ARTIFACT_FILES if name.startswith("compiled/")]
    assert caplog.text.count("from compile cache") == len(programs) == 5

    ids, mask = left_padded_batch(520, seed=7)
    expected = hf_greedy(load_reference(other), ids, mask, new_tokens=40)
    assert torch.equal(model.generate(ids, mask, max_new_tokens=40), expected)


def test_export_without_weights_loads_them_from_the_checkpoint(exported, tmp_path):
    source, model, _ = exported
    config = Gemma3NeuronModelForCausalLM.get_neuron_config(source, instance_type="cpu", **SHAPE)
    light = Gemma3NeuronModelForCausalLM.export(source, config, load_weights=False)
    folder = light.save_pretrained(tmp_path / "no-weights")
    assert not (folder / "model.safetensors").exists()
    reloaded = Gemma3NeuronModelForCausalLM.from_pretrained(folder)
    ids, mask = left_padded_batch(520, seed=8)
    assert torch.equal(
        reloaded.generate(ids, mask, max_new_tokens=20),
        model.generate(ids, mask, max_new_tokens=20),
    )


# -- refusals at export time --------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            dict(sequence_length=4096),
            "sequence_length=4096 exceeds the model's max_position_embeddings=512",
        ),
        (
            dict(sequence_length=64, context_encoding_buckets=[32, 128]),
            r"context_encoding_buckets=\[32, 128\] do not fit",
        ),
        (dict(context_encoding_buckets=[32, 16]), "strictly increasing"),
        (dict(batch_size=0), "batch_size must be a positive integer"),
        (dict(sequence_length=-1), "sequence_length must be a positive integer"),
        (dict(torch_dtype="int8"), "Unsupported torch_dtype 'int8'"),
        (dict(torch_dtype="float16"), "overflow float16; use bfloat16"),
        (dict(instance_type="trn9"), "Unknown instance_type 'trn9'"),
        (dict(tensor_parallel_size=3), r"tp_degree=3 cannot split .* degrees: \[1, 2, 4, 8\]"),
        (
            dict(tensor_parallel_size=2, instance_type="trn1", sequence_length=128),
            "tp_degree=2 on target 'trn1' is not built yet",
        ),
    ],
)
def test_invalid_export_config_names_the_field(tiny_checkpoints, overrides, message):
    kwargs = {"instance_type": "cpu", **overrides}
    with pytest.raises(ValueError, match=message):
        Gemma3NeuronModelForCausalLM.get_neuron_config(tiny_checkpoints("4b"), **kwargs)


def test_default_buckets_are_powers_of_two_up_to_the_context(tiny_checkpoints):
    config = Gemma3NeuronModelForCausalLM.get_neuron_config(
        tiny_checkpoints("4b"), sequence_length=500, instance_type="cpu"
    )
    assert config.context_encoding_buckets == [128, 256, 500]


def test_neuron_target_without_sdk_says_what_to_install(tiny_checkpoints):
    source = tiny_checkpoints("4b")
    config = Gemma3NeuronModelForCausalLM.get_neuron_config(
        source, instance_type="inf2", sequence_length=128
    )
    with pytest.raises(NeuronSdkMissingError, match="torch_neuronx.*optimum-gemma3\\[neuronx\\]"):
        Gemma3NeuronModelForCausalLM.export(source, config)


def test_unknown_model_type_is_refused(tmp_path):
    from transformers import LlamaConfig

    LlamaConfig().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="Unsupported model_type 'llama'"):
        Gemma3NeuronModelForCausalLM.get_neuron_config(tmp_path, instance_type="cpu")


# -- refusals at run time -----------------------------------------------------------------


def test_batch_larger_than_compiled_is_refused(exported):
    _, model, _ = exported
    ids = torch.full((4, 8), 5)
    with pytest.raises(ValueError, match="Batch of 4 rows exceeds the compiled batch_size=3"):
        model.generate(ids, max_new_tokens=2)


def test_prompt_longer_than_context_is_refused(exported):
    _, model, _ = exported
    with pytest.raises(ValueError, match=r"A prompt of 130 tokens exceeds .* bucket \(32 tokens\)"):
        model.generate(torch.full((1, 130), 5), max_new_tokens=2)


def test_smaller_batch_is_padded_and_too_many_new_tokens_are_clamped(exported, caplog):
    source, model, _ = exported
    ids, mask = left_padded_batch(520, lengths=(30,), seed=9)
    with caplog.at_level(logging.WARNING, logger="optimum_gemma3"):
        out = model.generate(ids, mask, max_new_tokens=200)
    assert "generating at most 98 tokens" in caplog.text
    assert out.shape == (1, 128)
    expected = hf_greedy(load_reference(source), ids, mask, new_tokens=98)
    assert torch.equal(out, expected)


@pytest.fixture
def artifact_copy(exported, tmp_path):
    _, model, _ = exported
    return model.save_pretrained(tmp_path / "copy")


def edit_neuron_config(folder: Path, **changes) -> None:
    path = folder / "neuron_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.mark.parametrize(
    "field, value",
    [
        ("torch_version", "2.8.0"),
        ("optimum_gemma3_version", "0.0.1"),
        ("compiler_version", "1.0"),
        ("optimum_neuron_version", "0.3.0"),
    ],
)
def test_version_mismatch_is_refused(artifact_copy, field, value):
    edit_neuron_config(artifact_copy, **{field: value})
    with pytest.raises(ArtifactError, match=f"neuron_config.json.*{field}=.{value}"):
        Gemma3NeuronModelForCausalLM.from_pretrained(artifact_copy)


@pytest.mark.parametrize(
    "name", ["compiled/decode-full_attention.pt2", "neuron_config.json", "model.safetensors"]
)
def test_missing_file_is_named(artifact_copy, name):
    (artifact_copy / name).unlink()
    with pytest.raises(ArtifactError, match=f"{name.replace('.', '[.]')} is missing"):
        Gemma3NeuronModelForCausalLM.from_pretrained(artifact_copy)


def test_corrupt_program_is_refused(artifact_copy):
    path = artifact_copy / "compiled/prefill-full_attention.pt2"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"prefill-full_attention\.pt2 is corrupt"):
        Gemma3NeuronModelForCausalLM.from_pretrained(artifact_copy)


def test_truncated_weights_are_refused(artifact_copy):
    path = artifact_copy / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ArtifactError, match=r"model\.safetensors is not a readable safetensors"):
        Gemma3NeuronModelForCausalLM.from_pretrained(artifact_copy)


# -- atomic writes ------------------------------------------------------------------------

EXPORT_SCRIPT = """
import sys
from optimum_gemma3 import Gemma3NeuronModelForCausalLM as M
source, destination = sys.argv[1], sys.argv[2]
config = M.get_neuron_config(source, batch_size=1, sequence_length=64, instance_type="cpu",
                             context_encoding_buckets=[8, 16, 32, 64])
M.export(source, config).save_pretrained(destination)
"""


def export_and_kill(source: Path, destination: Path, cache: Path, tmp: Path) -> None:
    """Start an export in a new process and SIGKILL it while it compiles."""
    tmp.mkdir(exist_ok=True)
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "OPTIMUM_GEMMA3_CACHE_DIR": str(cache),
        "TMPDIR": str(tmp),
    }
    process = subprocess.Popen(
        [sys.executable, "-c", EXPORT_SCRIPT, str(source), str(destination)],
        env=env,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while not list(tmp.glob("optimum-gemma3-export-*/model/.optimum-gemma3-save-*/compiled")):
        assert process.poll() is None, "export finished before it could be interrupted"
        assert time.monotonic() < deadline
        time.sleep(0.2)
    time.sleep(1.0)
    process.send_signal(signal.SIGKILL)
    process.wait()


def test_killed_export_leaves_nothing_loadable(tiny_checkpoints, exported, tmp_path):
    source = tiny_checkpoints("270m")
    destination = tmp_path / "out"
    export_and_kill(source, destination, tmp_path / "cache", tmp_path / "tmp")
    assert not destination.exists()
    assert not list((tmp_path / "cache").glob("*.pt2"))  # no truncated cache entry

    # An existing folder survives a killed re-export whole and loadable.
    _, model, _ = exported
    model.save_pretrained(destination)
    before = sorted(p.name for p in destination.rglob("*"))
    export_and_kill(source, destination, tmp_path / "cache", tmp_path / "tmp")
    assert sorted(p.name for p in destination.rglob("*")) == before
    Gemma3NeuronModelForCausalLM.from_pretrained(destination)
    assert not list(destination.glob(".optimum-gemma3-save-*"))


def test_config_class_round_trips(exported):
    _, model, folder = exported
    loaded = Gemma3NeuronConfig.from_pretrained(folder)
    assert loaded.to_dict() == model.neuron_config.to_dict()


# -- the ops profile ----------------------------------------------------------------------


def test_artifact_records_the_host_profile_and_the_head_uses_it(exported):
    _, model, folder = exported
    recorded = json.loads((folder / "neuron_config.json").read_text())["ops_profile"]
    host = OpsProfile.for_host()
    assert recorded == host.to_dict()
    assert recorded["kernels_isa"] == ("avx2+fma" if host.uses_kernels else None)
    assert model.neuron_config.ops_profile == host
    assert model.runtime.head.ops == host
    recorded_isa = json.loads((folder / "neuron_config.json").read_text())["program_isa"]
    assert recorded_isa == CpuBackend().program_isa() and recorded_isa  # e.g. "avx2"


def test_head_computes_with_the_recorded_profile_not_the_hosts(artifact_copy):
    """A folder traced with plain products keeps them on a host that has the kernels."""
    recorded = json.loads((artifact_copy / "neuron_config.json").read_text())["ops_profile"]
    edit_neuron_config(artifact_copy, ops_profile={**recorded, "skinny_linear": False})
    model = Gemma3NeuronModelForCausalLM.from_pretrained(artifact_copy)
    assert not model.runtime.head.ops.skinny_linear and model.runtime.head.screen is None


def test_profile_needing_unavailable_kernels_is_refused_at_load(exported):
    """Kernels off in a new process: loading says why and what to do, instead of loading
    programs that would fail at their first call."""
    _, _, folder = exported
    if not OpsProfile.for_host().uses_kernels:
        pytest.skip("exported without kernels on this host: nothing to refuse")
    message = run_in_new_process(
        "import json, os\n"
        "os.environ['OPTIMUM_GEMMA3_DISABLE_KERNELS'] = '1'\n"
        "from optimum_gemma3 import Gemma3NeuronModelForCausalLM as M\n"
        "from optimum_gemma3.artifact.files import ArtifactError\n"
        "try:\n"
        f"    M.from_pretrained({str(folder)!r})\n"
        "    print(json.dumps('loaded'))\n"
        "except ArtifactError as error:\n"
        "    print(json.dumps(str(error)))\n"
    )
    message = json.loads(message)
    assert "neuron_config.json records ops_profile=" in message
    assert "C++ CPU kernels (which need avx2+fma)" in message
    assert "OPTIMUM_GEMMA3_DISABLE_KERNELS is set" in message
    assert "Re-export the model on this host" in message


def test_programs_for_an_isa_this_cpu_lacks_are_refused_at_load(artifact_copy):
    edit_neuron_config(artifact_copy, program_isa="avx1024")
    with pytest.raises(
        ArtifactError, match="records program_isa='avx1024'.*this CPU lacks them. Re-export"
    ):
        Gemma3NeuronModelForCausalLM.from_pretrained(artifact_copy)


def test_folder_without_ops_profile_is_refused(artifact_copy):
    path = artifact_copy / "neuron_config.json"
    recorded = json.loads(path.read_text())
    del recorded["ops_profile"]
    path.write_text(json.dumps(recorded))
    with pytest.raises(ArtifactError, match="records no ops_profile.*Re-export the model"):
        Gemma3NeuronModelForCausalLM.from_pretrained(artifact_copy)
