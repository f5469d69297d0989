"""Registers `optimum-cli export neuron` for Gemma-3 on hosts without the AWS Neuron SDK,
and routes optimum-neuron's `optimum-cli neuron serve` to this package for Gemma-3.

How optimum finds this file: `optimum-cli` imports every module of the PEP 420 namespace
package `optimum.commands.register` (one directory per installed distribution, none of
them with an `__init__.py`) and registers what each module's `REGISTER_COMMANDS` lists.
optimum-neuron ships `register_export.py` there, which adds its `export neuron` command
only when `optimum.neuron.utils.is_neuronx_available()` is true, i.e. only when
`torch_neuronx` is installed.

- Host without the Neuron SDK: optimum-neuron registers no `export neuron`, so this module
  registers `Gemma3NeuronExportCommand` (`optimum_gemma3/integration/cli.py`) under that
  name. It exports Gemma-3 only (`--instance_type cpu` compiles and runs here).
- Host with the SDK: optimum-neuron's own `export neuron` is registered and this module
  registers nothing (a second `neuron` under `export` would make argparse abort every
  `optimum-cli` invocation with "conflicting subparser: neuron"). That command runs the
  export in a fresh `python3 -m optimum.exporters.neuron` process where nothing imports
  `optimum_gemma3`, so it cannot find Gemma-3. This module therefore wraps its `run()`:
  when `--model` is a `gemma3` / `gemma3_text` checkpoint, the export runs here through
  `export_from_args` (same flags: `--batch_size`, `--sequence_length`, `--num_cores`,
  `--auto_cast_type`, `--instance_type`, output); any other model goes to optimum-neuron's
  `run()` unchanged, and so does Gemma-3 when `OPTIMUM_GEMMA3_IMPLEMENTATION=optimum-neuron`
  selects optimum-neuron's own Gemma-3 (its parser has no `--implementation` flag; see
  `optimum_gemma3/integration/registry.py`). Verified here only on a simulated SDK host (no SDK
  module is faked: the test makes optimum-neuron's availability check say yes).
- The same file seen twice (an installed copy plus a checkout on sys.path) is harmless:
  the command reuses its own parser instead of adding a second `neuron`.

Cost at `optimum-cli` start-up: importing this module runs only stdlib code and
`optimum.commands` (argparse). The SDK probe copies `is_neuronx_available()` (a
`find_spec` and a metadata lookup) instead of calling it, because importing
`optimum.neuron.utils` imports transformers and torch (seconds). `REGISTER_COMMANDS` is
resolved on first access (PEP 562 module `__getattr__`): the command class lives in
`optimum_gemma3`, whose package import loads torch, and on SDK hosts it is never needed.
If `optimum_gemma3` cannot be imported, a warning is logged and nothing is registered, so
a broken install does not take down the other `optimum-cli` commands.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging

from optimum.commands.export.base import ExportCommand

logger = logging.getLogger(__name__)

# `--help` of optimum-neuron's serve command lists its own flags; the others reach
# optimum-gemma3 unparsed, so they are named here.
SERVE_EPILOG = (
    "Gemma-3 models are served by optimum-gemma3 (no vLLM needed), which also takes "
    "--host, --instance_type, --torch_dtype, --max_queue_size, --shutdown_timeout and "
    "--prefills_per_step: see `python -m optimum_gemma3.serve --help`."
)


def neuron_sdk_export_registered() -> bool:
    """Whether optimum-neuron registers its own `export neuron` command on this host.

    Same test as `optimum.neuron.utils.is_neuronx_available()`: `torch_neuronx` is importable
    and has distribution metadata.
    """
    if importlib.util.find_spec("torch_neuronx") is None:
        return False
    try:
        importlib.metadata.version("torch_neuronx")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def commands_to_register() -> list[tuple[type, type]]:
    """The `(command, parent)` pairs for optimum-cli: ours under `export`, or none on SDK hosts."""
    route_gemma3_through_optimum_neuron_serve()
    if neuron_sdk_export_registered():
        route_gemma3_through_optimum_neuron_command()
        return []
    try:
        from optimum_gemma3.integration.cli import Gemma3NeuronExportCommand
    except Exception as error:  # keep the rest of optimum-cli usable
        logger.warning(
            "optimum-gemma3 is installed but could not be imported (%s: %s): "
            "`optimum-cli export neuron` is not available.",
            type(error).__name__,
            error,
        )
        return []
    return [(Gemma3NeuronExportCommand, ExportCommand)]


def route_gemma3_through_optimum_neuron_command() -> None:
    """On SDK hosts: make optimum-neuron's `export neuron` export Gemma-3 with this plugin."""
    from optimum.commands.export.neuronx import NeuronxExportCommand

    route_gemma3(
        NeuronxExportCommand, "optimum_gemma3.integration.cli", "export_gemma3_if_supported"
    )


def route_gemma3_through_optimum_neuron_serve() -> None:
    """Make optimum-neuron's `neuron serve` serve Gemma-3 with this package.

    optimum-neuron registers `optimum-cli neuron serve` on every host; its `run()` needs
    vLLM and the Neuron SDK. For a Gemma-3 model compiled (or to be compiled) by
    optimum-gemma3, `optimum_gemma3.serve.launch.serve_if_gemma3` serves it instead, with
    the same flags; anything else goes to optimum-neuron's `run()` unchanged.
    """
    try:
        from optimum.commands.neuron.serve import ServeCommand
    except ImportError:  # an optimum-neuron without the command
        return
    route_gemma3(ServeCommand, "optimum_gemma3.serve.launch", "serve_if_gemma3")
    original_parse_args = ServeCommand.parse_args
    if getattr(original_parse_args, "_optimum_gemma3", False):
        return

    def parse_args(parser) -> None:
        original_parse_args(parser)
        parser.epilog = SERVE_EPILOG

    parse_args._optimum_gemma3 = True
    ServeCommand.parse_args = staticmethod(parse_args)


def route_gemma3(command_class: type, module: str, handler: str) -> None:
    """Wrap `command_class.run` (once): `module.handler(args)` runs the command for Gemma-3
    and returns True; for anything else it returns False and the original `run()` runs.
    The module is imported only when the command runs (it loads torch)."""
    original = command_class.run
    if getattr(original, "_optimum_gemma3", False):
        return

    def run(self) -> None:
        if not getattr(importlib.import_module(module), handler)(self.args):
            original(self)

    run._optimum_gemma3 = True
    command_class.run = run


def __getattr__(name: str):
    if name == "REGISTER_COMMANDS":
        commands = commands_to_register()
        globals()["REGISTER_COMMANDS"] = commands
        return commands
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
