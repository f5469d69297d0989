"""Start the server: flags, the model (loaded, or exported first), uvicorn.

The flags are optimum-neuron's `optimum-cli neuron serve` flags (`--model`,
`--served_model_name`, `--batch_size`, `--sequence_length`, `--tensor_parallel_size`,
`--port`; dashes or underscores) plus `--host`, `--instance_type`, `--torch_dtype` and
the server's own limits. `--model` is a compiled folder or Hub repo (loaded as is: the
shape flags must match it, as optimum-neuron checks), or a checkpoint, exported first
with those flags through the compile cache (optimum-neuron's fallbacks: batch 1,
sequence length 2048).

Why FastAPI and uvicorn: the ASGI stack vLLM's own OpenAI server runs on, so clients and
proxies see the same behaviour (SSE streaming, graceful SIGTERM: uvicorn stops accepting
and waits for open requests); prometheus-client is Prometheus' own Python library.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
from pathlib import Path

from ..artifact.files import NEURON_CONFIG_NAME
from ..runtime.batching import DEFAULT_PREFILLS_PER_STEP

logger = logging.getLogger(__name__)

PROG = "optimum-cli neuron serve"
# optimum-neuron's serve command falls back to these for a model it has to export.
DEFAULT_BATCH_SIZE = 1
DEFAULT_SEQUENCE_LENGTH = 2048


def add_serve_arguments(parser: argparse.ArgumentParser, optimum_neuron_flags: bool = True) -> None:
    """The flags. `optimum_neuron_flags=False` leaves out those optimum-neuron's own serve
    parser already has (the arguments it does not know reach us unparsed)."""

    def flag(*names: str, **kwargs) -> None:
        spelled = [n for name in names for n in (name, name.replace("_", "-"))]
        parser.add_argument(*dict.fromkeys(spelled), **kwargs)

    if optimum_neuron_flags:
        flag("-m", "--model", required=True, help="Compiled folder, Hub repo or checkpoint.")
        flag("--served_model_name", help="The model name in the API (default: --model).")
        flag("--batch_size", type=int, help="Cache slots: requests decoded together.")
        flag("--sequence_length", type=int, help="Prompt plus generated tokens, per request.")
        flag("--tensor_parallel_size", type=int, help="Ranks to shard the model over.")
        flag("--port", type=int, default=8080, help="Port to listen on (default 8080).")
    flag("--host", default="127.0.0.1", help="Address to bind (0.0.0.0: every interface).")
    flag("--instance_type", help="Export target for a checkpoint (default: this host's).")
    flag("--torch_dtype", help="Export dtype for a checkpoint: bfloat16 or float32.")
    flag(
        "--max_queue_size",
        type=int,
        default=256,
        help="Requests that may wait for a slot; beyond, 429 with Retry-After (default 256).",
    )
    flag(
        "--shutdown_timeout",
        type=float,
        default=30.0,
        help="Seconds requests in flight get to finish after SIGTERM (default 30).",
    )
    flag(
        "--prefills_per_step",
        type=int,
        default=DEFAULT_PREFILLS_PER_STEP,
        help="Requests that may join between two decode steps of running ones (default 1).",
    )


def is_compiled(model: str, token=None, revision=None) -> bool:
    """Whether `model` (a folder or Hub repo) holds a compiled model, not a checkpoint."""
    if Path(model).is_dir():
        return (Path(model) / NEURON_CONFIG_NAME).is_file()
    from huggingface_hub import file_exists

    return file_exists(model, NEURON_CONFIG_NAME, revision=revision, token=token)


def load_model(args: argparse.Namespace):
    """The compiled model `args.model` names, exported first if it is a checkpoint."""
    from ..integration.modeling import Gemma3NeuronModelForCausalLM

    if is_compiled(args.model):
        model = Gemma3NeuronModelForCausalLM.from_pretrained(args.model)
        nc = model.neuron_config
        for flag, value, compiled in (
            ("batch_size", args.batch_size, nc.batch_size),
            ("sequence_length", args.sequence_length, nc.sequence_length),
            ("tensor_parallel_size", args.tensor_parallel_size, nc.tp_degree),
        ):
            if value is not None and value != compiled:
                model.runtime.close()
                raise ValueError(
                    f"--{flag} {value} does not match the compiled model ({compiled}): omit "
                    "it, or serve the checkpoint to export it with your values."
                )
        return model
    logger.info("%s is a checkpoint: exporting it first (compile cache reused).", args.model)
    return Gemma3NeuronModelForCausalLM.from_pretrained(
        args.model,
        export=True,
        batch_size=args.batch_size or DEFAULT_BATCH_SIZE,
        sequence_length=args.sequence_length or DEFAULT_SEQUENCE_LENGTH,
        tensor_parallel_size=args.tensor_parallel_size or 1,
        instance_type=args.instance_type,
        torch_dtype=args.torch_dtype,
    )


def serve(args: argparse.Namespace) -> None:
    """Load the model and serve it until SIGTERM / Ctrl-C."""
    import uvicorn
    from transformers import AutoTokenizer

    from .app import build_app
    from .engine import ServingEngine

    StoppingServer = stopping_server_class()
    model = load_model(args)
    tokenizer = AutoTokenizer.from_pretrained(model.runtime.folder)
    engine = ServingEngine(model, args.max_queue_size, prefills_per_step=args.prefills_per_step)
    name = args.served_model_name or args.model
    app = build_app(engine, tokenizer, name, args.shutdown_timeout)
    logger.info(
        "Serving %s on http://%s:%d (batch_size=%d, sequence_length=%d).",
        name,
        args.host,
        args.port,
        model.neuron_config.batch_size,
        model.neuron_config.sequence_length,
    )
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        timeout_graceful_shutdown=args.shutdown_timeout,
        log_level="info",
    )
    StoppingServer(config).run()


def stopping_server_class():
    """uvicorn's server, except that a SIGTERM / SIGINT that stopped it gracefully ends the
    process with status 0 (uvicorn re-raises the signal, killing the process with it)."""
    import uvicorn

    class StoppingServer(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):
            with super().capture_signals():
                yield
                self._captured_signals.clear()

    return StoppingServer


def serve_or_exit(args: argparse.Namespace, prog: str) -> None:
    """`serve` with INFO logs; bad input or environment ends the process with one line."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        serve(args)
    except (ValueError, OSError) as error:
        raise SystemExit(f"{prog}: error: {error}") from None


def main(argv: list[str] | None = None) -> None:
    """`python -m optimum_gemma3.serve`."""
    parser = argparse.ArgumentParser(prog="python -m optimum_gemma3.serve", description=__doc__)
    add_serve_arguments(parser)
    serve_or_exit(parser.parse_args(argv), parser.prog)


def serve_if_gemma3(foreign_args: argparse.Namespace) -> bool:
    """Serve with this package when optimum-neuron's `neuron serve` was given a Gemma-3
    model compiled (or to be compiled) by optimum-gemma3; False for anything else, which
    optimum-neuron's command then runs unchanged. Flags optimum-neuron's parser does not
    know (`--host`, `--instance_type`, ...) reach here unparsed and are parsed here."""
    from transformers import AutoConfig

    from ..constants import MODEL_TYPES, OPTIMUM_GEMMA3
    from ..integration.registry import choose_implementation

    config = AutoConfig.from_pretrained(foreign_args.model)
    if config.model_type not in MODEL_TYPES:
        return False
    parser = argparse.ArgumentParser(prog=PROG)
    add_serve_arguments(parser, optimum_neuron_flags=False)
    args = parser.parse_args(getattr(foreign_args, "_unknown_args", None) or [])
    for name in ("model", "served_model_name", "batch_size", "sequence_length", "port"):
        setattr(args, name, getattr(foreign_args, name, None))
    args.tensor_parallel_size = getattr(foreign_args, "tensor_parallel_size", None)
    if args.port is None:
        args.port = 8080
    if getattr(foreign_args, "task", "generate") != "generate":
        raise SystemExit(f"{PROG}: error: Gemma-3 is served for --task generate only.")
    if is_compiled(args.model):
        if not _compiled_by_optimum_gemma3(args.model):
            return False
    elif choose_implementation(config.model_type, args.instance_type) != OPTIMUM_GEMMA3:
        return False
    serve_or_exit(args, PROG)
    return True


def _compiled_by_optimum_gemma3(model: str) -> bool:
    """Whether a compiled folder or repo's export config is optimum-gemma3's."""
    import json

    from huggingface_hub import hf_hub_download

    from ..artifact.neuron_config import Gemma3NeuronConfig

    path = Path(model) / NEURON_CONFIG_NAME
    if not path.is_file():
        path = Path(hf_hub_download(model, NEURON_CONFIG_NAME))
    return json.loads(path.read_text()).get("_serialized_key") == Gemma3NeuronConfig.__name__
