"""`python -m pipeline` is the same as the `label-images` command."""

from pipeline.cli import main

main()
