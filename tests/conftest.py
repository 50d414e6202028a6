"""Shared test fixtures.

The suite runs with TRITON_INTERPRET=1 (see Makefile): Triton kernels execute on CPU tensors in
Triton's interpreter and are compared with the float64 eager reference.
"""
import os

import pytest
import torch

from vitkern.testing import interpreter_bf16_dot_shim

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
requires_interpreter = pytest.mark.skipif(
    not INTERPRET, reason="Triton kernels run on CPU only under TRITON_INTERPRET=1 (make test sets it)")


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True, scope="session")
def _bf16_dot_shim():
    # Triton 3.8's interpreter multiplies bf16 bit patterns in tl.dot (triton issue 11584).
    # The shim upcasts bf16 dot operands in the interpreter only; kernels are unchanged.
    if INTERPRET:
        with interpreter_bf16_dot_shim():
            yield
    else:
        yield
