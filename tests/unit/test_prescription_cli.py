"""`dmp prescription dispense` options into the lines of a dispensing (pure)."""

from __future__ import annotations

import pytest

from dmp.cli.prescription import dispensed_lines
from dmp.errors import InvalidArgument
from dmp.prescriptions import CIP13_SYSTEM


def test_lines_given_substituted_and_not_delivered() -> None:
    lines = dispensed_lines(["0:2", "2:1"], ["2:3400930000014"], ["1:rupture de stock"])
    assert [(line.line, line.quantity, line.not_delivered_reason) for line in lines] == [
        (0, 2, ""),
        (1, 0, "rupture de stock"),
        (2, 1, ""),
    ]
    assert not lines[0].HasField("substitute")
    assert (lines[2].substitute.code.system, lines[2].substitute.code.code) == (
        CIP13_SYSTEM,
        "3400930000014",
    )


def test_without_lines_every_remaining_line_is_given() -> None:
    lines = dispensed_lines([], [], ["1:patient declined"], {0: 2, 1: 1, 2: 0})
    assert [(line.line, line.quantity) for line in lines] == [(0, 2), (1, 0)]
    assert lines[1].not_delivered_reason == "patient declined"


@pytest.mark.parametrize(
    ("given", "substitutes", "not_delivered"),
    [
        (["0"], [], []),
        (["x:1"], [], []),
        (["0:two"], [], []),
        (["0:1"], [], ["0:out of stock"]),
        (["0:1"], ["1:3400930000014"], []),
        ([], [], ["0:"]),
    ],
)
def test_malformed_options_are_refused(
    given: list[str], substitutes: list[str], not_delivered: list[str]
) -> None:
    with pytest.raises(InvalidArgument):
        dispensed_lines(given, substitutes, not_delivered)
