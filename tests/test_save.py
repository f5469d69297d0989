"""Saving never loses a file: `save_pretrained` and the export write this model's files into
a folder, replace only files an earlier save of this project wrote (its manifest,
`neuron_config.json`, lists them), and keep everything else; an interrupted save leaves the
previous model loadable or a folder that loading refuses, never a mix of two models."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from optimum_gemma3 import Gemma3NeuronModelForCausalLM
from optimum_gemma3.artifact.files import ArtifactError, files_below
from optimum_gemma3.paths import replaced_atomically
from tests.conftest import REPO
from tests.test_artifacts import SHAPE

WITH_VERIFY = {**SHAPE, "speculation_length": 1}  # the same programs, plus one


@pytest.fixture(scope="module")
def models(tiny_checkpoints):
    """Two exports of one tiny model: with the verify program (speculation_length 1) and
    without it (compiled once: the compile cache serves the second's programs)."""
    source = tiny_checkpoints("4b")

    def export(shape):
        config = Gemma3NeuronModelForCausalLM.get_neuron_config(
            source, instance_type="cpu", **shape
        )
        return Gemma3NeuronModelForCausalLM.export(source, config)

    return export(WITH_VERIFY), export(SHAPE)


def user_files(folder):
    files = {
        "notes.txt": "mine",
        "scripts/run.py": "print('hello')",
        "compiled/my-notes.txt": "kept beside the programs",
    }
    for name, text in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    return files


def assert_kept(folder, files):
    for name, text in files.items():
        assert (folder / name).read_text() == text, name


def speculation_of(folder) -> int:
    return json.loads((folder / "neuron_config.json").read_text())["speculation_length"]


def test_user_files_in_the_folder_and_its_subfolders_are_kept(models, tmp_path):
    model, _ = models
    folder = tmp_path / "mixed"
    folder.mkdir()
    files = user_files(folder)
    model.save_pretrained(folder)
    assert_kept(folder, files)
    reloaded = Gemma3NeuronModelForCausalLM.from_pretrained(folder)
    assert reloaded.neuron_config.speculation_length == 1


def test_self_draft_needs_its_programs(models):
    """A verify program without the self-draft's programs: self_draft=True says how to get them."""
    model, _ = models
    with pytest.raises(ValueError, match="draft_quantization_dtype='int8'"):
        model.generate(torch.tensor([[2, 9, 10]]), self_draft=True, max_new_tokens=2)


def test_saving_into_the_current_directory(models, tmp_path, monkeypatch):
    model, _ = models
    (tmp_path / "my_script.py").write_text("import optimum_gemma3\n")
    monkeypatch.chdir(tmp_path)
    model.save_pretrained(".")
    assert (tmp_path / "my_script.py").read_text() == "import optimum_gemma3\n"
    assert (tmp_path / "neuron_config.json").is_file()
    Gemma3NeuronModelForCausalLM.from_pretrained(tmp_path)


def test_a_path_that_is_a_file_is_refused(models, tmp_path):
    model, _ = models
    path = tmp_path / "model"
    path.write_text("not a folder")
    with pytest.raises(ArtifactError, match="is a file"):
        model.save_pretrained(path)
    assert path.read_text() == "not a folder"


def test_resaving_replaces_the_earlier_export_and_nothing_else(models, tmp_path):
    with_verify, without_verify = models
    folder = tmp_path / "out"
    with_verify.save_pretrained(folder)
    files = user_files(folder)
    assert (folder / "compiled/verify-full_attention.pt2").is_file()
    without_verify.save_pretrained(folder)
    stale = folder / "compiled/verify-full_attention.pt2"  # the earlier export's
    assert not stale.exists()
    assert speculation_of(folder) == 0
    assert_kept(folder, files)
    listed = set(json.loads((folder / "neuron_config.json").read_text())["artifact_files"])
    assert set(files_below(folder)) == listed | set(files) | {"neuron_config.json"}
    assert Gemma3NeuronModelForCausalLM.from_pretrained(folder).neuron_config.batch_size == 3


def test_a_file_the_model_would_overwrite_is_refused_and_nothing_changes(models, tmp_path):
    model, _ = models
    folder = tmp_path / "checkpoint-like"
    folder.mkdir()
    (folder / "config.json").write_text('{"mine": true}')
    before = {name: (folder / name).read_bytes() for name in files_below(folder)}
    with pytest.raises(ArtifactError, match="config.json"):
        model.save_pretrained(folder)
    assert {name: (folder / name).read_bytes() for name in files_below(folder)} == before
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # no staging left


def test_another_libraries_manifest_is_not_taken_for_ours(models, tmp_path):
    model, _ = models
    folder = tmp_path / "optimum-neuron-export"
    folder.mkdir()
    (folder / "neuron_config.json").write_text('{"_serialized_key": "NxDNeuronConfig"}')
    with pytest.raises(ArtifactError, match="neuron_config.json"):
        model.save_pretrained(folder)


def test_a_manifest_naming_files_outside_the_folder_is_refused(models, tmp_path):
    """A forged or edited manifest cannot make a save delete or overwrite a file elsewhere."""
    with_verify, without_verify = models
    folder = with_verify.save_pretrained(tmp_path / "out")
    victims = {tmp_path / "victim.txt": "not the model's", tmp_path / "elsewhere.txt": "mine"}
    for path, text in victims.items():
        path.write_text(text)
    manifest = json.loads((folder / "neuron_config.json").read_text())
    manifest["artifact_files"].update(
        {"../victim.txt": None, str(tmp_path / "elsewhere.txt"): None}
    )
    (folder / "neuron_config.json").write_text(json.dumps(manifest))
    before = {name: (folder / name).read_bytes() for name in files_below(folder)}
    with pytest.raises(ArtifactError, match="outside the folder"):
        without_verify.save_pretrained(folder)  # would remove the names it lists and lacks
    assert {name: (folder / name).read_bytes() for name in files_below(folder)} == before
    assert all(path.read_text() == text for path, text in victims.items())


def test_a_save_interrupted_before_its_first_move_owns_nothing(models, tmp_path):
    """Killed while staging, a save leaves its new manifest in its staging folder, but none
    of its files in the folder: a file of a name it lists, made later, is the user's."""
    with_verify, without_verify = models
    source = with_verify.save_pretrained(tmp_path / "source")
    folder = without_verify.save_pretrained(tmp_path / "out")
    staging = folder / ".optimum-gemma3-save-interrupted"
    staging.mkdir()
    (staging / "neuron_config.json").write_bytes((source / "neuron_config.json").read_bytes())
    mine = folder / "compiled/verify-full_attention.pt2"
    mine.write_text("the user's, though the staging manifest lists the name")
    without_verify.save_pretrained(folder)  # the name is not its: kept
    assert mine.read_text().startswith("the user's")
    with pytest.raises(ArtifactError, match="compiled/verify-full_attention.pt2"):
        with_verify.save_pretrained(folder)  # would overwrite it: refused
    assert mine.read_text().startswith("the user's")


def test_a_file_replaced_atomically_is_whole_or_untouched(tmp_path):
    """The one temp-then-rename write (manifest, model card, compile cache, kernels)."""
    path = tmp_path / "neuron_config.json"
    path.write_text("old")
    with pytest.raises(RuntimeError), replaced_atomically(path) as temporary:
        temporary.write_text("half of the n")
        raise RuntimeError("interrupted")
    assert path.read_text() == "old" and files_below(tmp_path) == [path.name]
    with replaced_atomically(path) as temporary:
        temporary.write_text("new")
    assert path.read_text() == "new" and files_below(tmp_path) == [path.name]


KILLED_SAVE = """
import os, signal, sys
from optimum_gemma3 import Gemma3NeuronModelForCausalLM
from optimum_gemma3.artifact import files

stage, after = sys.argv[1], int(sys.argv[2])
calls = []
wrapped = {"copy": files.shutil.copy2, "move": files.os.replace}


def dying(kind):
    def call(*args, **kwargs):
        calls.append(kind)
        if calls.count(stage) > after:
            os.kill(os.getpid(), signal.SIGKILL)  # as a crash or an OOM kill would
        return wrapped[kind](*args, **kwargs)
    return call


files.shutil.copy2 = dying("copy")
files.os.replace = dying("move")
model = Gemma3NeuronModelForCausalLM.from_pretrained(sys.argv[3])
model.save_pretrained(sys.argv[4])
"""


@pytest.mark.parametrize(
    "stage, after",
    [("copy", 2), ("move", 1), ("move", 4), ("move", 100)],
    ids=["while staging", "first move", "mid-way", "before the manifest"],
)
def test_a_killed_save_leaves_the_old_model_or_a_refused_folder(models, tmp_path, stage, after):
    with_verify, without_verify = models
    source = with_verify.save_pretrained(tmp_path / "source")
    folder = without_verify.save_pretrained(tmp_path / "out")
    files = user_files(folder)
    if stage == "move" and after == 100:  # the old manifest's and every file's but the new one's
        after = len(files_below(source))
    result = subprocess.run(
        [sys.executable, "-c", KILLED_SAVE, stage, str(after), str(source), str(folder)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
        env={**__import__("os").environ, "PYTHONPATH": str(REPO)},
    )
    assert result.returncode == -9, result.stderr[-3000:]
    assert_kept(folder, files)
    try:
        loaded = Gemma3NeuronModelForCausalLM.from_pretrained(folder)
    except ArtifactError as error:
        assert "unfinished save" in str(error) and stage == "move"
    else:
        assert stage == "copy"  # killed before anything in the folder changed
        assert loaded.neuron_config.speculation_length == 0
    if stage == "move":  # a second interrupted save still knows what the first wrote
        subprocess.run(
            [sys.executable, "-c", KILLED_SAVE, "copy", "1", str(source), str(folder)],
            timeout=300,
            cwd=REPO,
            env={**__import__("os").environ, "PYTHONPATH": str(REPO)},
            capture_output=True,
        )
    with_verify.save_pretrained(folder)  # a new save finishes the job
    assert speculation_of(folder) == 1
    assert not [p for p in folder.iterdir() if p.name.startswith(".optimum-gemma3-save")]
    assert_kept(folder, files)
    Gemma3NeuronModelForCausalLM.from_pretrained(folder)
