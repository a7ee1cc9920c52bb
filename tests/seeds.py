"""Fresh random inputs for every test run, drawn again on demand.

The kernel tests draw their inputs from seeds that mix a per-run base seed into each test's own
key, so every run (CI's included) checks inputs no earlier run saw, and a failure is reproduced
by setting the base seed that run printed: MPL_FAST_TEST_SEED=<seed> python -m pytest ...
conftest.py picks the base seed once per run (before pytest-xdist starts its workers, which
inherit it through the environment) and prints it at the end of the run.
"""
import hashlib
import os

import torch

ENV = "MPL_FAST_TEST_SEED"


def base_seed() -> int:
    value = os.environ.get(ENV)
    if value is None:
        raise RuntimeError(f"{ENV} is unset: conftest.py sets it when pytest starts")
    return int(value)


def fresh(key) -> int:
    """This run's seed for the inputs named by key (anything with a stable repr): the same key
    gives the same seed within a run and under the same base seed, another one otherwise."""
    digest = hashlib.blake2b(f"{base_seed()}/{key!r}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % 2**63


def generator(key, device="cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(fresh(key))
