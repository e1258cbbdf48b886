"""Run under torchrun by tests/helpers/runs.py: trains each (config, overrides) of its JSON argument in turn
inside the same process group, so one launch (one interpreter start, one DeepSpeed import per rank) serves
several recipes. WB_TEST_ARCHS: architectures to register first (name -> "module:SPEC")."""

import json
import os
import sys

if __name__ == "__main__":
    from gpu_workbench.parallel import RunConfig, train
    from gpu_workbench.parallel.models import ARCHS
    from gpu_workbench.parallel.runtime.distributed import exit_worker

    for name, where in json.loads(os.environ.get("WB_TEST_ARCHS", "{}")).items():
        ARCHS.add(name, where)
    for config, overrides in json.loads(sys.argv[1]):
        train(RunConfig.from_toml(config, overrides))
    exit_worker(0)
