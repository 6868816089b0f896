"""Command workflows: read inputs, run the library with progress, write outputs.

One module per command; :mod:`spp_cli.cli` only parses options and calls
the ``run_*`` function, which returns the exit code.
"""
