"""franca.core.errors.check_choice: one line naming the option, the value and every choice."""

from __future__ import annotations

import pytest

from franca.core.errors import ConfigError, check_choice


def test_check_choice_accepts_a_choice_and_names_all_of_them_otherwise() -> None:
    check_choice("--search", "torch", ("auto", "torch", "faiss"))
    with pytest.raises(ConfigError) as caught:
        check_choice("--search", "scann", ("auto", "torch", "faiss"))
    assert str(caught.value) == "--search 'scann' is not one of auto, torch, faiss"
