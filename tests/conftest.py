"""Suite-wide test settings: `gpu` tests are skipped where CUDA is absent; a process group a test module
leaves behind in the pytest process is named and destroyed, so it cannot change the tests after it on that
worker (the dry run, for one, refuses to start inside a process group)."""

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
def pytest_runtest_teardown(item, nextitem):
    """After a module's last test and its module fixtures' teardown: no process group may outlive the module."""
    import torch.distributed as dist

    yield
    if nextitem is not None and nextitem.module is item.module:
        return
    if dist.is_available() and dist.is_initialized():
        warnings.warn(f"{item.module.__name__} left a process group behind: destroyed", stacklevel=1)
        print(f"\nwb-tests: {item.module.__name__} left a process group behind: destroyed")
        dist.destroy_process_group()
