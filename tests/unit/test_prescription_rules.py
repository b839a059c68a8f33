"""The life of a prescription (dmp/prescription_rules.py), as a pure state machine."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from dmp.clock import to_us
from dmp.errors import FailedPrecondition, InvalidArgument
from dmp.identity import Principal, Role
from dmp.ins import make_ins
from dmp.prescription_rules import (
    DAY_US,
    Progress,
    cancel,
    check_dispensable,
    check_dispensed_lines,
    check_idempotency_key,
    claim,
    dispensed,
    hold_us,
    next_dispensing_after,
    release,
    state,
    status,
)
from dmp.prescriptions import (
    ALREADY_DISPENSED,
    CANCELLED,
    CIP13_SYSTEM,
    HELD_BY_ANOTHER_PHARMACY,
    PRESCRIPTION_EXPIRED,
    QUANTITY_EXCEEDED,
    RENEWAL_NOT_YET_DUE,
    build_prescription,
    new_prescription_id,
    parse_line,
)
from dmp.v1 import prescription_pb2 as P
from dmp.v1 import record_pb2

NOW = datetime(2026, 11, 30, 10, 0, tzinfo=UTC)
T0 = int(NOW.timestamp() * 1_000_000)
ME = "urn:dmp:practitioner:10000000003"
OTHER = "urn:dmp:practitioner:10000000009"
DOCTOR = Principal(Role.PRACTITIONER, "10000000001", "Dr Claire MARTIN", "doctor")


def rx(renewals: int = 2, interval: int = 0, **kwargs: object) -> P.Prescription:
    return build_prescription(
        prescription_id=new_prescription_id("11"),
        patient_ins=make_ins("1850275123456"),
        prescriber=DOCTOR,
        organization="Cabinet",
        lines=[parse_line("3400930000001|2"), parse_line("3400930000002|1")],
        renewals=renewals,
        min_interval_days=interval,
        now=NOW,
        **kwargs,  # type: ignore[arg-type]
    )


def refused(reason: str, prescription: P.Prescription, progress: Progress, at: int) -> str:
    with pytest.raises(FailedPrecondition) as info:
        check_dispensable(prescription, progress, at, ME)
    assert info.value.reason == reason
    return info.value.message


def test_a_new_prescription_is_active_with_everything_remaining() -> None:
    prescription = rx()
    shown = state(prescription, Progress(), T0, ME)
    assert shown.status == P.PRESCRIPTION_STATUS_ACTIVE
    assert [(r.line, r.quantity) for r in shown.remaining] == [(0, 2), (1, 1)]
    assert shown.renewals_remaining == 2
    assert not shown.HasField("next_dispensing_after") and not shown.HasField("held_until")
    assert check_dispensable(prescription, Progress(), T0, ME) == 0


def test_first_then_each_renewal_then_completed() -> None:
    prescription = rx(renewals=2)
    progress = Progress()
    for expected in (0, 1, 2):
        assert check_dispensable(prescription, progress, T0 + expected, ME) == expected
        progress = dispensed(progress, T0 + expected)
    assert status(prescription, progress, T0 + 10) == P.PRESCRIPTION_STATUS_COMPLETED
    shown = state(prescription, progress, T0 + 10, ME)
    assert [r.quantity for r in shown.remaining] == [0, 0] and shown.renewals_remaining == 0
    message = refused(ALREADY_DISPENSED, prescription, progress, T0 + 10)
    assert "3 time(s)" in message


def test_after_the_first_dispensing_it_is_partially_dispensed() -> None:
    prescription = rx(renewals=1, interval=20)
    progress = dispensed(Progress(), T0)
    shown = state(prescription, progress, T0 + DAY_US * 2, ME)
    assert shown.status == P.PRESCRIPTION_STATUS_PARTIALLY_DISPENSED
    assert shown.renewals_remaining == 0
    assert to_us(shown.next_dispensing_after) == T0 + 20 * DAY_US


def test_the_same_day_again_is_already_dispensed_then_the_renewal_is_not_due() -> None:
    prescription = rx(renewals=1, interval=20)
    progress = dispensed(Progress(), T0)
    assert "already dispensed" in refused(
        ALREADY_DISPENSED, prescription, progress, T0 + 3600 * 1_000_000
    )
    message = refused(RENEWAL_NOT_YET_DUE, prescription, progress, T0 + 2 * DAY_US)
    assert "2026-12-20" in message
    assert check_dispensable(prescription, progress, T0 + 20 * DAY_US, ME) == 1
    assert next_dispensing_after(prescription, progress) == T0 + 20 * DAY_US


def test_the_first_dispensing_must_come_before_its_validity() -> None:
    prescription = rx(dispense_before=datetime(2026, 12, 30, tzinfo=UTC))
    end = to_us(prescription.dispense_before)
    assert status(prescription, Progress(), end - 1) == P.PRESCRIPTION_STATUS_ACTIVE
    assert status(prescription, Progress(), end) == P.PRESCRIPTION_STATUS_EXPIRED
    message = refused(PRESCRIPTION_EXPIRED, prescription, Progress(), end)
    assert "first dispensing had to happen before 2026-12-30" in message
    # Once dispensed, renewals run to the treatment end, not to that date.
    assert status(prescription, dispensed(Progress(), T0), end + 1) == (
        P.PRESCRIPTION_STATUS_PARTIALLY_DISPENSED
    )


def test_nothing_is_dispensed_after_the_treatment_end() -> None:
    prescription = rx(treatment_end=datetime(2027, 1, 30, tzinfo=UTC))
    end = to_us(prescription.treatment_end)
    progress = dispensed(Progress(), T0)
    assert status(prescription, progress, end) == P.PRESCRIPTION_STATUS_EXPIRED
    assert "treatment ended on 2027-01-30" in refused(
        PRESCRIPTION_EXPIRED, prescription, progress, end
    )
    shown = state(prescription, progress, end, ME)
    assert [r.quantity for r in shown.remaining] == [0, 0] and shown.renewals_remaining == 0


def test_without_a_treatment_end_twelve_months_at_most() -> None:
    prescription = rx()
    progress = dispensed(Progress(), T0)
    year = int(datetime(2027, 11, 30, 10, 0, tzinfo=UTC).timestamp() * 1_000_000)
    assert status(prescription, progress, year - 1) == P.PRESCRIPTION_STATUS_PARTIALLY_DISPENSED
    assert status(prescription, progress, year) == P.PRESCRIPTION_STATUS_EXPIRED


def test_a_cancelled_prescription_is_not_dispensed() -> None:
    prescription = rx()
    progress = cancel(prescription, Progress(), T0)
    assert status(prescription, progress, T0) == P.PRESCRIPTION_STATUS_CANCELLED
    assert "cancelled" in refused(CANCELLED, prescription, progress, T0 + 1)
    assert to_us(state(prescription, progress, T0, ME).cancelled_time) == T0
    assert cancel(prescription, progress, T0 + 5) == progress  # twice: the first time stays


def test_cancelling_the_remaining_renewals() -> None:
    prescription = rx(renewals=2)
    progress = cancel(prescription, dispensed(Progress(), T0), T0 + 1)
    assert progress.dispensed == 1
    assert status(prescription, progress, T0 + 2) == P.PRESCRIPTION_STATUS_CANCELLED
    refused(CANCELLED, prescription, progress, T0 + 2)


def test_nothing_to_cancel_once_all_was_dispensed() -> None:
    prescription = rx(renewals=0)
    with pytest.raises(FailedPrecondition) as info:
        cancel(prescription, dispensed(Progress(), T0), T0 + 1)
    assert info.value.reason == ALREADY_DISPENSED


# -- holds --------------------------------------------------------------------------------------


def test_a_hold_keeps_others_out_and_ends_with_the_holders_dispensing() -> None:
    prescription = rx()
    held = claim(prescription, Progress(), T0, OTHER, 0)
    assert held.held_until_us == T0 + 300 * 1_000_000
    message = refused(HELD_BY_ANOTHER_PHARMACY, prescription, held, T0 + 1)
    assert OTHER not in message and "another pharmacy" in message
    with pytest.raises(FailedPrecondition) as info:
        claim(prescription, held, T0 + 1, ME, 0)
    assert info.value.reason == HELD_BY_ANOTHER_PHARMACY
    shown = state(prescription, held, T0 + 1, OTHER)
    assert shown.held_by_caller and to_us(shown.held_until) == held.held_until_us
    assert not state(prescription, held, T0 + 1, ME).held_by_caller
    assert check_dispensable(prescription, held, T0 + 1, OTHER) == 0
    after = dispensed(held, T0 + 2)
    assert after.holder is None and after.held_until_us is None


def test_a_hold_lapses_and_is_extended_by_its_holder() -> None:
    prescription = rx()
    held = claim(prescription, Progress(), T0, OTHER, 60)
    assert check_dispensable(prescription, held, T0 + 60 * 1_000_000, ME) == 0  # lapsed
    again = claim(prescription, held, T0 + 30 * 1_000_000, OTHER, 60)
    assert again.held_until_us == T0 + 90 * 1_000_000


def test_release_by_its_holder_only() -> None:
    prescription = rx()
    held = claim(prescription, Progress(), T0, OTHER, 0)
    with pytest.raises(FailedPrecondition) as info:
        release(prescription, held, T0 + 1, ME)
    assert info.value.reason == HELD_BY_ANOTHER_PHARMACY
    assert release(prescription, held, T0 + 1, OTHER).holder is None
    assert release(prescription, Progress(), T0, ME) == Progress()


def test_what_is_not_dispensable_is_not_claimed() -> None:
    prescription = rx()
    with pytest.raises(FailedPrecondition) as info:
        claim(prescription, cancel(prescription, Progress(), T0), T0, ME, 0)
    assert info.value.reason == CANCELLED


@pytest.mark.parametrize("seconds", [-1, 901])
def test_a_hold_is_bounded(seconds: int) -> None:
    with pytest.raises(InvalidArgument, match="hold_seconds"):
        hold_us(seconds)
    assert hold_us(900) == 900 * 1_000_000


# -- the lines of a dispensing ----------------------------------------------------------


def given(line: int, quantity: int, **kwargs: object) -> P.DispensedLine:
    return P.DispensedLine(line=line, quantity=quantity, **kwargs)  # type: ignore[arg-type]


def test_lines_within_their_quantity_partial_or_not_delivered() -> None:
    prescription = rx()
    lines = [given(0, 1), given(1, 0, not_delivered_reason="rupture de stock")]
    assert check_dispensed_lines(prescription, lines) == lines


def test_a_line_beyond_its_quantity_is_quantity_exceeded() -> None:
    with pytest.raises(FailedPrecondition, match="at most 2") as info:
        check_dispensed_lines(rx(), [given(0, 3)])
    assert info.value.reason == QUANTITY_EXCEEDED


def test_a_substitute_where_the_prescriber_allowed_it_only() -> None:
    prescription = rx()
    substitute = P.Medication(code=record_pb2.Coding(system=CIP13_SYSTEM, code="3400939999999"))
    check_dispensed_lines(prescription, [given(0, 2, substitute=substitute)])
    prescription.lines[0].substitution_allowed = False
    with pytest.raises(InvalidArgument, match="not substitutable"):
        check_dispensed_lines(prescription, [given(0, 2, substitute=substitute)])


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        ([], "at least one line"),
        ([given(2, 1)], "not a line of the prescription"),
        ([given(0, 1), given(0, 1)], "given twice"),
        ([given(0, -1)], "negative"),
        ([given(0, 0)], "needs a not_delivered_reason"),
        ([given(0, 1, not_delivered_reason="x")], "has no not_delivered_reason"),
        (
            [given(0, 0, not_delivered_reason="rupture"), given(1, 0, not_delivered_reason="x")],
            "gives nothing",
        ),
        ([given(1, 0, not_delivered_reason="rupture de stock")], "gives nothing"),
    ],
)
def test_malformed_lines_are_refused(lines: list[P.DispensedLine], message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        check_dispensed_lines(rx(), lines)


@pytest.mark.parametrize("key", ["short", "x" * 65, "é" * 10, "tab\there-key"])
def test_an_idempotency_key_is_8_to_64_printable_ascii(key: str) -> None:
    with pytest.raises(InvalidArgument, match="idempotency_key"):
        check_idempotency_key(key)
    assert check_idempotency_key("0123456789abcdef") == "0123456789abcdef"
