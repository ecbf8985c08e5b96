"""Fixtures shared by test modules."""

import pytest

from megatron_vlm import runtime


@pytest.fixture(scope="module")
def single_rank():
    """This process as a world of one (megatron's parallel state, seed 1234) for a module's tests;
    a module asks for it with ``pytestmark = pytest.mark.usefixtures("single_rank")``."""
    runtime.initialize(seed=1234)
    yield
    runtime.shutdown()
