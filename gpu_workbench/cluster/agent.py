"""torchrun for `wb train --nproc N`: torch's own agent (torch.distributed.run, same arguments), quiet when
a worker failed with a user mistake it recorded (parallel/runtime/worker_errors.py). The launcher then prints that
one line and exits 2; the agent's failure report, log lines and traceback would only bury it. Any other
failure (a bug, a lost rank) keeps all of them.

    python -m gpu_workbench.cluster.agent --nproc-per-node=2 ... -m gpu_workbench train ...
"""

from __future__ import annotations

import logging
import os
import sys

from gpu_workbench.parallel.runtime import worker_errors


class _QuietAfterMistake(logging.Filter):
    def __init__(self, folder: str):
        super().__init__()
        self.folder = folder

    def filter(self, record: logging.LogRecord) -> bool:
        return worker_errors.first(self.folder) is None


def main(argv: list[str]) -> None:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    folder = os.environ.get(worker_errors.ENV, "")
    if folder:   # a logger's filter sees only its own records: every torch.distributed logger gets one
        quiet = _QuietAfterMistake(folder)
        for name, logger in list(logging.root.manager.loggerDict.items()):
            if name.startswith("torch.distributed") and isinstance(logger, logging.Logger):
                logger.addFilter(quiet)
    try:
        run(parse_args(argv))
    except ChildFailedError:
        if folder and worker_errors.first(folder) is not None:
            sys.exit(2)
        raise


if __name__ == "__main__":
    main(sys.argv[1:])
