"""`python -m optimum_gemma3.serve`: see `optimum_gemma3.serve.launch`."""

from .launch import main

main()
