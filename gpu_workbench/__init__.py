"""gpu-workbench: Triton kernels, parallelism recipes, launchers and profiling harnesses.

The parts, bottom up (docs/ARCHITECTURE.md, "Layers"): `gpu_workbench.kernels` and
`gpu_workbench.profiling` import nothing of the project; `gpu_workbench.parallel` builds on them;
`gpu_workbench.cluster` launches it; `gpu_workbench.cli` is the `wb` command line.

    from gpu_workbench import kernels
    from gpu_workbench.parallel import RunConfig, train
"""
