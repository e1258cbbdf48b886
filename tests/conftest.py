"""Suite-wide test settings: `gpu` tests are skipped where CUDA is absent; a process group a test leaves behind
in the pytest process is named and destroyed, so it cannot change the tests after it on that worker (the dry
run, for one, refuses to start inside a process group)."""

import warnings

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    import torch.distributed as dist

    had_group = dist.is_available() and dist.is_initialized()
    yield
    if not had_group and dist.is_available() and dist.is_initialized():
        warnings.warn(f"{item.nodeid} left a process group behind: destroyed", stacklevel=1)
        print(f"\nwb-tests: {item.nodeid} left a process group behind: destroyed")
        dist.destroy_process_group()
