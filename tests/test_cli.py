"""`optimum-cli export neuron` on a host without the Neuron SDK: registration, export, errors.

The export tests run the installed `optimum-cli` in a subprocess, which is what users run:
they prove the namespace file `optimum/commands/register/register_gemma3.py` is found
through the installed package. Argument and error tests that fail before compiling call
optimum's `main()` in-process, which is the same code path without the ~10 s start-up.
The fp32 export uses the shapes of tests/test_artifacts.py so both share compiled programs
through the compile cache.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from optimum_gemma3 import Gemma3NeuronModelForCausalLM
from optimum_gemma3.integration.cli import Gemma3NeuronExportCommand
from tests.test_parity import NEW_TOKENS, hf_greedy, left_padded_batch
from tests.tiny_models import load_reference

REPO = Path(__file__).resolve().parents[1]
OPTIMUM_CLI = Path(sys.executable).parent / "optimum-cli"
SHAPE_ARGS = [
    "--task",
    "text-generation",
    "--batch_size",
    "3",
    "--sequence_length",
    "128",
    "--context_encoding_buckets",
    "16,32",
    "--instance_type",
    "cpu",
]
FLAGS = (
    "--model",
    "--task",
    "--batch_size",
    "--sequence_length",
    "--num_cores",
    "--tensor_parallel_size",
    "--auto_cast_type",
    "--torch_dtype",
    "--instance_type",
    "--max_context_length",
    "--context_encoding_buckets",
    "--revision",
    "--token",
    "--no_weights",
    "--implementation",
    "--speculation_length",
    "--draft_quantization_dtype",
    "output",
)
# Files of the user's in the export's output folder, which the export keeps.
USER_FILES = {"notes.txt": "mine", "compiled/my-notes.txt": "beside the programs"}
NOT_INSTALLED = (
    "optimum-cli does not see register_gemma3.py: reinstall the package "
    "(`pip install -e .`) so optimum/commands/register is installed."
)


def optimum_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run the venv's optimum-cli with this process's environment (compile cache, offline)."""
    assert OPTIMUM_CLI.is_file(), f"{OPTIMUM_CLI} is missing: install optimum in this venv."
    return subprocess.run(
        [str(OPTIMUM_CLI), *args],
        capture_output=True,
        text=True,
        timeout=1200,
        env=dict(os.environ),
        cwd=cwd or REPO,
    )


def cli_in_process(monkeypatch, capsys, *args: str) -> tuple[int | str | None, str]:
    """optimum-cli's `main()` in this process: (exit code or message, stderr)."""
    from optimum.commands import optimum_cli as cli_module

    monkeypatch.setattr(sys, "argv", ["optimum-cli", *args])
    with pytest.raises(SystemExit) as exit_info:
        cli_module.main()
    return exit_info.value.code, capsys.readouterr().err


# -- registration ---------------------------------------------------------------------------


def test_export_help_lists_neuron_once(tmp_path):
    result = optimum_cli("export", "--help", cwd=tmp_path)  # outside the repo: installed path
    assert result.returncode == 0, result.stderr[-2000:]
    assert "{neuron}" in result.stdout, NOT_INSTALLED
    assert "Export Gemma-3 models" in result.stdout


def test_export_neuron_help_shows_the_flags(tmp_path):
    result = optimum_cli("export", "neuron", "--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    missing = [flag for flag in FLAGS if flag not in result.stdout]
    assert not missing, result.stdout


def test_register_module_imports_no_torch():
    """optimum-cli imports every register module at start-up: ours must stay cheap."""
    code = (
        "import sys\n"
        "import optimum.commands.register.register_gemma3\n"
        "heavy = {'torch', 'transformers', 'optimum_gemma3'} & set(sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]


def test_sdk_probe_matches_optimum_neuron():
    from optimum.neuron.utils import is_neuronx_available

    from optimum.commands.register import register_gemma3

    assert register_gemma3.neuron_sdk_export_registered() == is_neuronx_available()


SIMULATED_SDK_HOST = """
import sys
import optimum.neuron.utils as neuron_utils
from optimum.commands import optimum_cli
from optimum.commands.register import register_gemma3

# optimum-neuron's register_export.py asks this when optimum-cli starts: pretend the SDK is
# installed so it registers its `export neuron` (no SDK module is imported or faked).
neuron_utils.is_neuronx_available = lambda: True
if sys.argv[1] == "probe-agrees":
    register_gemma3.neuron_sdk_export_registered = lambda: True  # our probe on that host
sys.argv = ["optimum-cli", "export", "--help"]
optimum_cli.main()
"""


def test_on_sdk_hosts_only_optimum_neurons_command_is_registered():
    """Both registered would be a `conflicting subparser: neuron` crash of every command."""
    run = [sys.executable, "-c", SIMULATED_SDK_HOST]
    result = subprocess.run([*run, "probe-agrees"], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "{neuron}" in result.stdout
    assert "Export PyTorch models to Neuronx" in result.stdout  # optimum-neuron's, not ours
    assert "Gemma-3" not in result.stdout

    # The control: registering ours as well is exactly the clash the gate avoids.
    clash = subprocess.run([*run, "probe-disagrees"], capture_output=True, text=True, cwd=REPO)
    assert clash.returncode != 0
    assert "conflicting subparser: neuron" in clash.stderr


def test_register_file_seen_twice_keeps_one_parser():
    """An installed copy of register_gemma3.py plus a checkout on sys.path: read twice."""
    from optimum.commands.base import BaseOptimumCLICommand, CommandInfo, RootOptimumCLICommand
    from optimum.commands.export.base import ExportCommand
    from optimum.commands.optimum_cli import register_optimum_cli_subcommand

    root = RootOptimumCLICommand("optimum-cli")
    register_optimum_cli_subcommand(ExportCommand, parent_command=root)
    export = root.registered_subcommands[0]
    register_optimum_cli_subcommand(Gemma3NeuronExportCommand, parent_command=export)
    register_optimum_cli_subcommand(Gemma3NeuronExportCommand, parent_command=export)
    assert list(export.subparsers.choices) == ["neuron"]
    args = root.parser.parse_args(["export", "neuron", "--model", "m", "--batch_size", "2", "o"])
    assert isinstance(args.func(args), Gemma3NeuronExportCommand)
    assert args.batch_size == 2

    class OtherNeuron(BaseOptimumCLICommand):
        COMMAND = CommandInfo(name="neuron", help="someone else's")

    with pytest.raises(argparse.ArgumentError, match="conflicting subparser: neuron"):
        register_optimum_cli_subcommand(OtherNeuron, parent_command=export)


# -- arguments ------------------------------------------------------------------------------


@pytest.fixture
def parse():
    parser = argparse.ArgumentParser("optimum-cli export neuron")
    Gemma3NeuronExportCommand.parse_args(parser)
    return lambda *args: parser.parse_args(["--model", "m", *args])


def test_aliases_share_one_destination(parse):
    args = parse("--num_cores", "1", "--auto_cast_type", "bf16", "out")
    assert (args.tensor_parallel_size, args.torch_dtype, args.output) == (1, "bf16", Path("out"))
    args = parse("--tensor_parallel_size", "1", "--torch_dtype", "bfloat16", "out")
    assert (args.tensor_parallel_size, args.torch_dtype) == (1, "bfloat16")
    defaults = parse("out")
    assert (defaults.task, defaults.instance_type, defaults.torch_dtype) == (
        "text-generation",
        None,
        None,
    )


@pytest.mark.parametrize(
    "words, expected",
    [(["16,32"], [[16, 32]]), (["16", "32"], [[16], [32]]), (["16, 32 64"], [[16, 32, 64]])],
)
def test_bucket_lengths_comma_or_space_separated(parse, words, expected):
    args = parse("out", "--context_encoding_buckets", *words)
    assert args.context_encoding_buckets == expected


def test_output_swallowed_by_buckets_is_explained(parse, capsys):
    with pytest.raises(SystemExit):
        parse("--context_encoding_buckets", "16,32", "out")
    assert "If it is the output folder, put it before" in capsys.readouterr().err


# -- export ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cli_export(tiny_checkpoints, tmp_path_factory):
    """`optimum-cli export neuron` of the 4b-shaped tiny model, fp32, test_artifacts' shapes,
    into a folder that already holds a user's files."""
    source = tiny_checkpoints("4b")
    output = tmp_path_factory.mktemp("cli") / "tiny-4b"
    for name, text in USER_FILES.items():
        (output / name).parent.mkdir(parents=True, exist_ok=True)
        (output / name).write_text(text)
    result = optimum_cli("export", "neuron", "--model", str(source), *SHAPE_ARGS, str(output))
    assert result.returncode == 0, result.stderr[-3000:]
    return source, output, result


def test_cli_export_generates_transformers_tokens(cli_export):
    source, output, result = cli_export
    assert "Saved" in result.stderr
    recorded = json.loads((output / "neuron_config.json").read_text())
    assert recorded["target"] == "cpu"
    assert recorded["torch_dtype"] == "float32"
    assert (recorded["batch_size"], recorded["sequence_length"]) == (3, 128)
    assert recorded["context_encoding_buckets"] == [16, 32]
    assert (output / "model.safetensors").is_file()
    assert {name: (output / name).read_text() for name in USER_FILES} == USER_FILES  # kept

    model = Gemma3NeuronModelForCausalLM.from_pretrained(output)
    ids, mask = left_padded_batch(520)  # prompts of 5, 23, 14 tokens: buckets 16 and 32
    expected = hf_greedy(load_reference(source), ids, mask)
    assert torch.equal(model.generate(ids, mask, max_new_tokens=NEW_TOKENS), expected)


def test_cli_export_bf16_one_core_without_weights(cli_export, tmp_path):
    """The optimum-neuron flag names: bf16 compiles new programs (minutes on a cold cache)."""
    source, _, _ = cli_export
    output = tmp_path / "bf16"
    args = [*SHAPE_ARGS, "--auto_cast_type", "bf16", "--num_cores", "1", "--no_weights"]
    result = optimum_cli("export", "neuron", "--model", str(source), *args, str(output))
    assert result.returncode == 0, result.stderr[-3000:]
    recorded = json.loads((output / "neuron_config.json").read_text())
    assert recorded["torch_dtype"] == "bfloat16"
    assert recorded["tp_degree"] == 1
    assert recorded["context_encoding_buckets"] == [16, 32]
    assert not (output / "model.safetensors").exists()

    model = Gemma3NeuronModelForCausalLM.from_pretrained(output)  # weights from --model
    ids, mask = left_padded_batch(520, seed=5)
    assert model.generate(ids, mask, max_new_tokens=4).shape == (3, ids.shape[1] + 4)


# -- errors: one line, non-zero status, nothing written --------------------------------------


def test_non_gemma3_model_is_refused_with_what_to_do(tmp_path):
    from transformers import LlamaConfig

    LlamaConfig().save_pretrained(tmp_path / "llama")
    output = tmp_path / "out"
    result = optimum_cli("export", "neuron", "--model", str(tmp_path / "llama"), str(output))
    assert result.returncode == 1
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("optimum-cli export neuron: error:")
    assert "'llama' model" in error
    assert "compiles only Gemma-3 (gemma3_text and gemma3)" in error
    assert "install the Neuron SDK" in error
    assert "Traceback" not in result.stderr
    assert not output.exists()


def test_other_task_is_refused(monkeypatch, capsys, tmp_path):
    code, err = cli_in_process(
        monkeypatch, capsys, "export", "neuron", "--model", "m", "--task", "fill-mask", "out"
    )
    assert code == 2
    assert "argument --task: 'fill-mask' is not supported" in err
    assert "for 'text-generation' and, multimodal checkpoints, 'image-text-to-text'" in err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--sequence_length", "100000"], "sequence_length=100000 exceeds the model's"),
        (["--auto_cast_type", "fp16"], "Gemma-3 activations overflow float16"),
        (["--num_cores", "3"], "tp_degree=3 cannot split this model"),
        (["--draft_quantization_dtype", "int8"], "set speculation_length=k"),
        (["--instance_type", "trn1", "--sequence_length", "128"], "needs the AWS Neuron SDK"),
        (
            ["--instance_type", "cpu", "--implementation", "optimum-neuron"],
            "compiles for Neuron instances only",
        ),
        (
            ["--instance_type", "trn1", "--implementation", "optimum-neuron"],
            "registers no 'gemma3_text' model here",
        ),
    ],
)
def test_invalid_export_config_exits_with_the_field(
    tiny_checkpoints, monkeypatch, capsys, tmp_path, args, message
):
    output = tmp_path / "out"
    source = str(tiny_checkpoints("4b"))
    code, _ = cli_in_process(
        monkeypatch, capsys, "export", "neuron", "--model", source, *args, str(output)
    )
    assert isinstance(code, str) and code.startswith("optimum-cli export neuron: error:"), code
    assert message in code
    assert not output.exists()


def test_output_that_would_overwrite_other_files_is_refused_before_compiling(
    tiny_checkpoints, monkeypatch, capsys, tmp_path
):
    source = tiny_checkpoints("4b")
    a_file = tmp_path / "a-file"
    a_file.write_text("mine")
    before = {path.name: path.stat().st_mtime_ns for path in source.iterdir()}
    for output, messages in [(source, ["config.json", "did not write"]), (a_file, ["is a file"])]:
        code, _ = cli_in_process(
            monkeypatch, capsys, "export", "neuron", "--model", str(source), str(output)
        )
        assert isinstance(code, str) and all(message in code for message in messages), code
    assert a_file.read_text() == "mine"
    assert {path.name: path.stat().st_mtime_ns for path in source.iterdir()} == before


SIMULATED_SDK_EXPORT = """
import sys
import optimum.neuron.utils as neuron_utils
from optimum.commands import optimum_cli
from optimum.commands.register import register_gemma3

neuron_utils.is_neuronx_available = lambda: True  # optimum-neuron registers its command
register_gemma3.neuron_sdk_export_registered = lambda: True
sys.argv = ["optimum-cli", "export", "neuron", *sys.argv[1:]]
optimum_cli.main()
"""


def test_on_sdk_hosts_optimum_neurons_command_exports_gemma3_with_this_plugin(
    tiny_checkpoints, tmp_path
):
    """optimum-neuron's command would spawn `python -m optimum.exporters.neuron`, which knows
    no Gemma-3; the wrapped run() exports in-process through this plugin instead. Here the
    Neuron target then fails on the real missing SDK, with this plugin's message."""
    command = [
        sys.executable,
        "-c",
        SIMULATED_SDK_EXPORT,
        "--model",
        str(tiny_checkpoints("4b")),
        "--task",
        "text-generation",
        "--batch_size",
        "1",
        "--sequence_length",
        "64",
        "--instance_type",
        "trn1",
        str(tmp_path / "out"),
    ]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    assert result.returncode != 0
    assert "The neuron backend needs the AWS Neuron SDK" in result.stderr, result.stderr[-2000:]
    assert "optimum.exporters.neuron" not in result.stderr


def test_on_sdk_hosts_the_environment_variable_selects_the_implementation(
    tiny_checkpoints, tmp_path
):
    """optimum-neuron's parser has no --implementation: the variable reaches the choice. Here
    optimum-neuron has no Gemma-3 of its own, so choosing it fails in one line."""
    command = [
        sys.executable,
        "-c",
        SIMULATED_SDK_EXPORT,
        "--model",
        str(tiny_checkpoints("4b")),
        "--instance_type",
        "trn1",
        str(tmp_path / "out"),
    ]
    env = {**os.environ, "OPTIMUM_GEMMA3_IMPLEMENTATION": "optimum-neuron"}
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env)
    assert result.returncode != 0
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("optimum-cli export neuron: error: OPTIMUM_GEMMA3_IMPLEMENTATION=")
    assert "registers no 'gemma3_text' model here" in error
    assert "Traceback" not in result.stderr
