"""Shared fixtures: zoo models are built and traced once per test session."""

from __future__ import annotations

import functools
import os
import sys
import warnings

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, os.path.dirname(__file__))
warnings.filterwarnings("ignore", module="torch")

from zoo import ZOO_BY_NAME  # noqa: E402

import lora_fx  # noqa: E402


@functools.cache
def traced(name: str):
    """(model, args, kwargs, gm) for a zoo case; the model and gm are shared, so never mutate them."""
    model, args, kwargs = ZOO_BY_NAME[name].build()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm = lora_fx.trace(model, args, kwargs)
    return model, args, kwargs, gm


@pytest.fixture
def zoo_traced():
    return traced
