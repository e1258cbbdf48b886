"""`python -m gpu_workbench ...`: the `wb` command line (also what torchrun runs on every rank)."""

from gpu_workbench.cli.app import main

main()
