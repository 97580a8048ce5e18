"""The few torch facilities vebi needs that torch offers only privately, or types loosely:
each is wrapped here, once, so every use goes through one function (and a torch upgrade that
moves one breaks in one place)."""

from __future__ import annotations

from collections.abc import Sized
from typing import cast

import torch
import torch.overrides
from torch.utils.data import Dataset


def dataset_size(dataset: Dataset) -> int:
    """``len(dataset)``: torch's ``Dataset`` declares no ``__len__`` (a map-style data set
    has one; the jobs only take those), so type checkers refuse ``len`` on it."""
    return len(cast(Sized, dataset))


def tensor_version(tensor: torch.Tensor) -> int:
    """The version counter of ``tensor``'s storage, bumped by every in-place change: how
    :class:`vebi.models.hooks.CapturedOutputs` tells that a model changed a recorded output
    in place (``out += identity``). torch has no public accessor for it (autograd reads the
    same counter to refuse backward passes through modified tensors); ``Tensor._version`` is
    private."""
    return int(tensor._version)


def current_function_mode() -> torch.overrides.TorchFunctionMode | None:
    """The innermost active ``TorchFunctionMode`` (None without one). torch offers no public
    query of the mode stack; the functional backward rules (:mod:`vebi.explain.rules`) need
    it to leave their mode only when it is still the innermost one after a forward pass that
    raised (exiting a mode that is not on top would corrupt torch's mode stack)."""
    return torch.overrides._get_current_function_mode()
