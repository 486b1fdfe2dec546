"""The torch backend meets the backend contract (``tests/backend_contract.py``)."""

from __future__ import annotations

import pytest
from backend_contract import BackendContract

pytest.importorskip("torch")


class TestTorchContract(BackendContract):
    backend_name = "torch"
