"""The examples in the docstrings run, as doctests, and say what they show: every public
module of deq_jax is searched, and the functions a user reaches first must carry one."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import deq_jax

MODULES = sorted(m.name for m in pkgutil.walk_packages(deq_jax.__path__, "deq_jax."))
FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


def _examples(module) -> list[doctest.DocTest]:
    tests = doctest.DocTestFinder().find(module, module.__name__)
    return [t for t in tests if t.examples]


@pytest.mark.parametrize("name", [m for m in MODULES if _examples(importlib.import_module(m))])
def test_the_docstring_examples_run(name):
    runner = doctest.DocTestRunner(optionflags=FLAGS)
    for test in _examples(importlib.import_module(name)):
        runner.run(test)
    results = runner.summarize(verbose=False)
    assert results.failed == 0, f"{results.failed} of {results.attempted} doctest examples failed in {name}"


@pytest.mark.parametrize("obj", [
    deq_jax.fixed_point, deq_jax.equilibrium, deq_jax.hutchinson_frobenius, deq_jax.spectral_radius,
    deq_jax.solvers.broyden, deq_jax.solvers.anderson, deq_jax.solvers.fixed_point_iteration,
    deq_jax.linen.DEQ, deq_jax.nnx.DEQ,
], ids=lambda o: f"{o.__module__}.{o.__qualname__}")
def test_the_entry_points_carry_an_example(obj):
    tests = doctest.DocTestFinder(recurse=False).find(obj)
    assert any(len(t.examples) >= 2 for t in tests), f"{obj.__qualname__} has no docstring example"
