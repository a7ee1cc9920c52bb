"""The kernel tests' fresh random inputs: one base seed a run, a stable seed per key."""
import pytest

from tests import seeds


def test_a_key_draws_the_same_seed_under_one_base_and_another_under_another(monkeypatch):
    keys = (0, 1, (3, "bf16"), "case")
    monkeypatch.setenv(seeds.ENV, "12345")
    first = [seeds.fresh(key) for key in keys]
    assert len(set(first)) == 4  # keys do not share inputs
    assert first == [seeds.fresh(key) for key in keys]
    a = seeds.generator((3, "bf16"))
    b = seeds.generator((3, "bf16"))
    assert a.initial_seed() == b.initial_seed() == first[2]
    monkeypatch.setenv(seeds.ENV, "12346")
    assert all(seeds.fresh(key) != seed for key, seed in zip(keys, first))


def test_the_base_seed_is_set_for_the_run():
    assert seeds.base_seed() >= 0  # conftest.py chose one (or took the environment's)


def test_without_a_base_seed_there_is_no_silent_default(monkeypatch):
    monkeypatch.delenv(seeds.ENV)
    with pytest.raises(RuntimeError, match=seeds.ENV):
        seeds.fresh(0)
