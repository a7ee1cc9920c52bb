import os

# The Triton kernels are tested on CPU tensors through Triton's interpreter; it must be on
# before triton is first imported.
os.environ.setdefault("TRITON_INTERPRET", "1")

import random  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from tests import seeds  # noqa: E402


def _share_the_cores_between_xdist_workers():
    # `-n auto` starts a worker a core; each one's torch (and the processes its tests start,
    # through OMP_NUM_THREADS) would otherwise run a thread a core too, and oversubscribed
    # OpenMP threads stall each other: slower, and op timings that swing tenfold. A thread count
    # the user set is left as it is.
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1 and "OMP_NUM_THREADS" not in os.environ:
        threads = max(1, (os.cpu_count() or 1) // workers)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)


_share_the_cores_between_xdist_workers()


def pytest_configure(config):
    # one base seed a run, chosen here in the main process: xdist workers inherit it
    value = os.environ.setdefault(seeds.ENV, str(random.SystemRandom().randrange(2**31)))
    if not value.isdigit():
        raise pytest.UsageError(f"{seeds.ENV} must be a non-negative integer, got {value!r}")
    from mpl_fast.ops.backend import interpreter_problem

    problem = interpreter_problem()  # the kernels' CPU tests would all fail, each saying less
    if problem:
        raise pytest.UsageError(problem)


def pytest_terminal_summary(terminalreporter):
    terminalreporter.write_line(f"random test inputs drawn with {seeds.ENV}="
                                f"{seeds.base_seed()} (set it to draw the same ones again)")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def cuda_device():
    return torch.device("cuda")
