"""Shared fixtures. With CI=true a missing system dependency (Java, TorchServe, Redis, promtool) is a failure."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

IN_CI = os.environ.get("CI", "").lower() == "true"


def require_binary(name: str, why: str) -> str:
    """Path of an executable; skip the test where it is missing, fail instead under CI=true."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} not found on PATH ({why})"
        if IN_CI:
            pytest.fail(message + "; CI=true requires it")
        pytest.skip(message)
    return path


@pytest.fixture(autouse=True, scope="session")
def _single_thread_torch() -> None:
    # The suite runs on 2 cores beside other processes; one torch thread keeps runs predictable.
    torch.set_num_threads(1)
