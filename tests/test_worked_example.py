"""The range coder's worked example (rangecoder.py's docstring) is true of the coder."""
import doctest

import pytest

import rangecoder


@pytest.mark.core
def test_the_range_coders_worked_example_gives_the_bytes_it_shows():
    result = doctest.testmod(rangecoder)
    assert result.attempted >= 5 and result.failed == 0
