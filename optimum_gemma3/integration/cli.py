"""`optimum-cli export neuron` for Gemma-3 on hosts without the AWS Neuron SDK.

optimum-neuron registers its own `export neuron` command only when the SDK is installed
(see `optimum/commands/register/register_gemma3.py`), so without it this command fills the
gap for Gemma-3: it reads the same flag names as optimum-neuron's command (`--model`,
`--task`, `--batch_size`, `--sequence_length`, `--num_cores`, `--auto_cast_type`,
`--torch_dtype`, `--instance_type`, positional output), builds the export config with
`Gemma3NeuronModelForCausalLM.get_neuron_config` (`--task image-text-to-text`:
`Gemma3NeuronModelForImageTextToText`'s, with `--max_num_images`), compiles with `.export`
and writes the artifact folder with `.save_pretrained`.

optimum-cli builds every registered parser at start-up, so this module imports only
argparse and `optimum.commands`; the model stack is imported by `run()`. (Importing it
still runs `optimum_gemma3/__init__.py`, which loads torch: see register_gemma3.py.)
User errors (a non-Gemma-3 model, an invalid shape, a missing checkpoint, a Neuron target
without the SDK) end the process with one `error:` line and a non-zero status, not a
traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import re
import time
from collections.abc import Iterator
from pathlib import Path

from optimum.commands.base import BaseOptimumCLICommand, CommandInfo

from ..constants import (
    DRAFT_DTYPES,
    IMAGE_TASK,
    IMPLEMENTATION_ENV,
    IMPLEMENTATIONS,
    MODEL_TYPES,
    OPTIMUM_GEMMA3,
    OPTIMUM_NEURON,
    TASK,
)

logger = logging.getLogger(__name__)

INSTANCE_TYPES = ("cpu", "inf2", "trn1", "trn1n", "trn2")
DTYPES = ("bf16", "fp16", "fp32", "bfloat16", "float16", "float32")
PROG = "optimum-cli export neuron"
# Set on the parsers this command creates, to recognise them when registered twice.
PARSER_MARKER = "_optimum_gemma3_export"


class CliError(Exception):
    """A user error reported as one line (no traceback)."""


TASKS = (TASK, IMAGE_TASK)


def _task(value: str) -> str:
    """argparse type for `--task`: text generation, or image-text-to-text (multimodal)."""
    if value not in TASKS:
        raise argparse.ArgumentTypeError(
            f"{value!r} is not supported: optimum-gemma3 exports Gemma-3 models for {TASK!r} "
            f"and, multimodal checkpoints, {IMAGE_TASK!r}."
        )
    return value


def _bucket_lengths(value: str) -> list[int]:
    """argparse type for one `--context_encoding_buckets` word: `16,32`, `16` or `"16 32"`."""
    parts = [part for part in re.split(r"[,\s]+", value) if part]
    try:
        return [int(part) for part in parts]
    except ValueError:
        # nargs="+" also swallows a following positional: say so, it is the likely cause.
        raise argparse.ArgumentTypeError(
            f"{value!r} is not a list of prompt lengths (integers, e.g. 128,256,512). If it "
            "is the output folder, put it before --context_encoding_buckets."
        ) from None


def parse_args_gemma3(parser: argparse.ArgumentParser) -> None:
    """The command's flags: optimum-neuron's names where they exist, plus the bucket flags."""
    parser.description = (
        "Compile a Gemma-3 checkpoint (gemma3 or gemma3_text) into an optimum-gemma3 artifact "
        "folder. Without the AWS Neuron SDK only Gemma-3 is handled; --instance_type cpu "
        "compiles and runs on this host."
    )
    required = parser.add_argument_group("Required arguments")
    required.add_argument(
        "-m",
        "--model",
        type=str,
        required=True,
        help="Model ID on huggingface.co or path on disk to load the model from.",
    )
    required.add_argument(
        "output",
        type=Path,
        help="Folder to write the compiled model into (other files in it are kept).",
    )

    optional = parser.add_argument_group("Optional arguments")
    optional.add_argument(
        "--task",
        type=_task,
        default=TASK,
        help=f"The task to export the model for: {TASK!r} (the default) or {IMAGE_TASK!r} "
        "(multimodal gemma3 checkpoints: adds the vision program and the processor).",
    )
    optional.add_argument(
        "--instance_type",
        choices=INSTANCE_TYPES,
        default=None,
        help="Target the compiled model runs on. Default: cpu on hosts without the Neuron SDK.",
    )
    optional.add_argument(
        "--auto_cast_type",
        "--torch_dtype",
        dest="torch_dtype",
        choices=DTYPES,
        default=None,
        metavar="DTYPE",
        help="Weights and activations dtype: bf16, fp32 (default) or their torch names "
        "bfloat16, float32. fp16 is refused: Gemma-3 activations overflow it.",
    )
    optional.add_argument(
        "--num_cores",
        "--tensor_parallel_size",
        dest="tensor_parallel_size",
        type=int,
        default=None,
        metavar="N",
        help="Tensor parallelism degree (cpu: any degree that splits the model; Neuron: 1).",
    )
    optional.add_argument(
        "--implementation",
        choices=IMPLEMENTATIONS,
        default=None,
        help=f"Which Gemma-3 compiles for a Neuron instance when the installed optimum-neuron "
        f"has its own: {OPTIMUM_GEMMA3} (default) or {OPTIMUM_NEURON}. Default: the "
        f"{IMPLEMENTATION_ENV} environment variable, else {OPTIMUM_GEMMA3}. The cpu target "
        f"is always {OPTIMUM_GEMMA3}.",
    )
    optional.add_argument("--revision", type=str, default=None, help="Hub revision to export.")
    optional.add_argument(
        "--token", type=str, default=None, help="Hugging Face token for private Hub models."
    )
    optional.add_argument(
        "--no_weights",
        action="store_true",
        help="Export without weights: they are loaded from --model when the folder is loaded.",
    )

    shapes = parser.add_argument_group("Input shapes")
    shapes.add_argument(
        "--batch_size",
        type=int,
        default=None,
        metavar="N",
        help="Batch size the programs take (default 1).",
    )
    shapes.add_argument(
        "--sequence_length",
        type=int,
        default=None,
        metavar="N",
        help="KV cache length: prompt plus generated tokens (default min(4096, the model's "
        "max_position_embeddings)).",
    )
    shapes.add_argument(
        "--max_context_length",
        type=int,
        default=None,
        metavar="N",
        help="Longest prompt (default sequence_length).",
    )
    shapes.add_argument(
        "--context_encoding_buckets",
        type=_bucket_lengths,
        nargs="+",
        default=None,
        metavar="LENGTHS",
        help="Prefill lengths, comma or space separated: 128,256,512 or 128 256 512 (default: "
        "powers of two from 128 up to max_context_length). It takes every word that follows, "
        "so give the output folder before it, or another option or -- after it.",
    )
    shapes.add_argument(
        "--max_num_images",
        type=int,
        default=None,
        metavar="N",
        help=f"{IMAGE_TASK} only: the most images one prompt may hold (default 4, or as many "
        "as max_context_length has room for).",
    )

    speculation = parser.add_argument_group("Speculative decoding")
    speculation.add_argument(
        "--speculation_length",
        type=int,
        default=0,
        metavar="K",
        help="Drafted tokens the verify program checks per row and step (default 0: no "
        "verify program); generate() drafts them with prompt_lookup_num_tokens, "
        "assistant_model or self_draft=True. cpu target, one core.",
    )
    speculation.add_argument(
        "--draft_quantization_dtype",
        choices=DRAFT_DTYPES,
        default=None,
        help="Adds the self-draft's programs: a weight-only copy of the model in this format, "
        "made at load, drafting for generate(self_draft=True). Needs --speculation_length.",
    )


class Gemma3NeuronExportCommand(BaseOptimumCLICommand):
    """`optimum-cli export neuron` for Gemma-3, registered only when optimum-neuron's is not."""

    COMMAND = CommandInfo(
        name="neuron",
        help="Export Gemma-3 models to optimum-gemma3 compiled folders (no Neuron SDK needed "
        "for --instance_type cpu).",
    )

    def __init__(
        self,
        subparsers: argparse._SubParsersAction | None,
        args: argparse.Namespace | None = None,
        command: CommandInfo | None = None,
        from_defaults_factory: bool = False,
        parser: argparse.ArgumentParser | None = None,
    ):
        # optimum-cli registers what every `register_gemma3.py` on the namespace path lists,
        # and there are two when an installed copy and a source checkout on sys.path (cwd,
        # PYTHONPATH) are both visible: the second `add_parser("neuron")` would abort every
        # optimum-cli command with "conflicting subparser". Reuse our own parser instead.
        # Anyone else's `neuron` parser (optimum-neuron's) still conflicts, loudly.
        name = (command or self.COMMAND).name
        existing = None if subparsers is None else subparsers.choices.get(name)
        if not from_defaults_factory and existing is not None:
            if existing.get_default(PARSER_MARKER):
                from_defaults_factory, parser = True, existing
        super().__init__(
            subparsers,
            args=args,
            command=command,
            from_defaults_factory=from_defaults_factory,
            parser=parser,
        )

    @staticmethod
    def parse_args(parser: argparse.ArgumentParser) -> None:
        parse_args_gemma3(parser)
        parser.set_defaults(**{PARSER_MARKER: True})

    def run(self) -> None:
        with _user_errors_exit(), _progress_logs():
            export_from_args(self.args)


def export_gemma3_if_supported(foreign_args: argparse.Namespace) -> bool:
    """Export with this plugin when optimum-neuron's own command was given a Gemma-3 model.

    Used on SDK hosts (see `optimum/commands/register/register_gemma3.py`). The flags that
    both commands share keep their meaning (`--auto_cast matmul|all` selects
    `--auto_cast_type` as the dtype); optimum-neuron-only flags do not apply to Gemma-3.
    Returns False (not handled) for any other architecture, and for Gemma-3 when
    optimum-neuron's own implementation is chosen (`--implementation`, or the environment
    variable where optimum-neuron's parser lacks the flag).
    """
    from transformers import AutoConfig

    revision, token = getattr(foreign_args, "revision", None), getattr(foreign_args, "token", None)
    config = AutoConfig.from_pretrained(foreign_args.model, revision=revision, token=token)
    if config.model_type not in MODEL_TYPES:
        return False
    parser = argparse.ArgumentParser(prog=PROG)
    parse_args_gemma3(parser)
    args = parser.parse_args(["--model", foreign_args.model, str(foreign_args.output)])
    for name in (
        "task",
        "instance_type",
        "batch_size",
        "sequence_length",
        "tensor_parallel_size",
        "torch_dtype",
        "revision",
        "token",
        "implementation",
        "max_num_images",
        "speculation_length",
    ):
        value = getattr(foreign_args, name, None)
        if value is not None:
            setattr(args, name, value)
    # optimum-neuron casts to --auto_cast_type only when --auto_cast asks for it.
    if getattr(foreign_args, "auto_cast", None) in ("matmul", "all"):
        args.torch_dtype = foreign_args.auto_cast_type
    with _user_errors_exit(), _progress_logs():
        if not _compiled_by_optimum_gemma3(args, config.model_type):
            return False
        _export(args, config)
    return True


def export_from_args(args: argparse.Namespace) -> Path:
    """Resolve the config, compile and save: the whole command, without the error handling."""
    from transformers import AutoConfig

    from .registry import refuse_without_sdk

    config = AutoConfig.from_pretrained(args.model, revision=args.revision, token=args.token)
    if config.model_type not in MODEL_TYPES:
        refuse_without_sdk(config.model_type, args.task, source=args.model)
        raise CliError(
            f"{args.model} is a {config.model_type!r} model: optimum-neuron's own `{PROG}` "
            "exports it; this one (optimum-gemma3's) exports Gemma-3 only."
        )
    if not _compiled_by_optimum_gemma3(args, config.model_type):
        raise CliError(
            f"{OPTIMUM_NEURON}'s Gemma-3 is exported by optimum-neuron's own `{PROG}`, which "
            "optimum-cli offers on hosts with the AWS Neuron SDK."
        )
    return _export(args, config)


def _compiled_by_optimum_gemma3(args: argparse.Namespace, model_type: str) -> bool:
    """Whether this plugin compiles the Gemma-3 export (logs the choice where there is one)."""
    from .registry import choose_implementation

    chosen = choose_implementation(model_type, args.instance_type, args.implementation)
    return chosen == OPTIMUM_GEMMA3


def _export(args: argparse.Namespace, config) -> Path:
    """Compile the Gemma-3 checkpoint `args.model` and save it to `args.output`."""
    from .image_text import Gemma3NeuronModelForImageTextToText
    from .modeling import Gemma3NeuronModelForCausalLM

    _check_output(Path(args.output))

    buckets = args.context_encoding_buckets
    if buckets is not None:
        buckets = [length for word in buckets for length in word]
    model_class, image_options = Gemma3NeuronModelForCausalLM, {}
    if args.task == IMAGE_TASK:
        model_class = Gemma3NeuronModelForImageTextToText
        image_options = {"max_num_images": args.max_num_images}
    elif args.max_num_images is not None:
        raise CliError(f"--max_num_images applies to --task {IMAGE_TASK} only.")

    neuron_config = model_class.get_neuron_config(
        args.model,
        config=config,
        token=args.token,
        revision=args.revision,
        instance_type=args.instance_type,  # None: cpu without the SDK, logged
        batch_size=args.batch_size,
        sequence_length=args.sequence_length,
        tensor_parallel_size=args.tensor_parallel_size,
        torch_dtype=args.torch_dtype,
        max_context_length=args.max_context_length,
        context_encoding_buckets=buckets,
        speculation_length=args.speculation_length,
        draft_quantization_dtype=args.draft_quantization_dtype,
        **image_options,
    )
    logger.info(
        "Exporting %s for %s: batch_size=%d, sequence_length=%d, context_encoding_buckets=%s, "
        "torch_dtype=%s%s.",
        args.model,
        neuron_config.target,
        neuron_config.batch_size,
        neuron_config.sequence_length,
        neuron_config.context_encoding_buckets,
        neuron_config.dtype_name,
        ", without weights" if args.no_weights else "",
    )
    start = time.perf_counter()
    model = model_class.export(
        args.model,
        neuron_config,
        token=args.token,
        revision=args.revision,
        load_weights=not args.no_weights,
    )
    logger.info("Export done in %.1f s; saving to %s.", time.perf_counter() - start, args.output)
    folder = model.save_pretrained(args.output)
    logger.info(
        "Saved %s. Load it with %s.from_pretrained(%r).",
        folder,
        model_class.__name__,
        str(folder),
    )
    return folder


def _check_output(output: Path) -> None:
    """Refuse, before compiling, an output the save would refuse after: a file, or a folder
    holding files of the same names that this project did not write (a checkpoint)."""
    from ..artifact.files import (
        CONFIG_NAME,
        NEURON_CONFIG_NAME,
        PROGRAMS_DIR,
        WEIGHTS_NAME,
        refuse_overwriting,
    )

    names = [CONFIG_NAME, NEURON_CONFIG_NAME, WEIGHTS_NAME, f"{PROGRAMS_DIR}/decode"]
    refuse_overwriting(output.absolute(), names)


@contextlib.contextmanager
def _user_errors_exit() -> Iterator[None]:
    """End the process with one `error:` line for errors that describe bad input or
    environment; anything else (a bug) keeps its traceback."""
    from ..artifact.files import ArtifactError
    from ..compiler.neuron import NeuronSdkMissingError

    user_errors = (CliError, ValueError, OSError, ArtifactError, NeuronSdkMissingError)
    try:
        yield
    except user_errors as error:
        raise SystemExit(f"{PROG}: error: {error}") from None


@contextlib.contextmanager
def _progress_logs() -> Iterator[None]:
    """Show optimum-gemma3's INFO logs (export steps, one line per program) on stderr.

    Lines go through `tqdm.write` so they do not break the compile progress bar. The compile
    cache's own INFO line is muted (the export already logs "<program>: from compile cache").
    Logger levels and handlers are restored afterwards, for callers running the command
    in-process.
    """
    from tqdm.contrib.logging import logging_redirect_tqdm

    package = logging.getLogger("optimum_gemma3")
    cache = logging.getLogger("optimum_gemma3.compiler.cache")
    levels = package.level, cache.level
    package.setLevel(logging.INFO)
    cache.setLevel(logging.WARNING)
    try:
        with logging_redirect_tqdm(loggers=[package]):
            yield
    finally:
        package.setLevel(levels[0])
        cache.setLevel(levels[1])
