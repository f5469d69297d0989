"""A worker process of an export: compiles the programs its parent sends it.

Run as `python -m optimum_gemma3.compiler.worker` by `export._compile_side_by_side`, which
writes `(jobs, config, neuron_config, folder)` pickled to its stdin (this package's own
objects, from the parent process: nothing downloaded is unpickled).
"""

from __future__ import annotations

import pickle
import sys

from .export import compile_program


def main() -> None:
    jobs, config, neuron_config, folder = pickle.load(sys.stdin.buffer)
    for job in jobs:
        compile_program(job, config, neuron_config, folder)


if __name__ == "__main__":
    main()
