"""The data-module contract (vebi.data.ClassificationData) that every job checks on entry
(every shipped data module meets it: tests/test_configs.py)."""

from __future__ import annotations

import lightning as L
import pytest

from vebi.data import SplitDataModule, check_data_contract
from vebi.errors import VebiError


class _NoMiningSplit(L.LightningDataModule):
    class_names = ("a", "b")
    data_test = None


def test_a_data_module_without_the_contract_is_refused_with_what_it_lacks() -> None:
    with pytest.raises(VebiError) as refused:
        check_data_contract(_NoMiningSplit(), "data (mine._NoMiningSplit)")
    message = str(refused.value)
    assert "lacks num_classes, image_shape, batch_size, num_workers, mining_dataset" in message
    assert "class_names" not in message.split("lacks")[1].split(",")[0]
    assert "vebi.data.SplitDataModule" in message
    with pytest.raises(VebiError, match="must be a LightningDataModule"):
        check_data_contract(object())


def test_the_contract_is_checked_without_reading_the_data() -> None:
    """Properties such as image_shape may need the files; the check must not evaluate them."""

    class Lazy(SplitDataModule):
        class_names = ("a",)

        @property
        def image_shape(self) -> tuple[int, int, int]:
            raise AssertionError("evaluated")

    assert check_data_contract(Lazy()) is not None
