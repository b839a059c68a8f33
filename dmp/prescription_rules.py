"""The rules of a prescription's life, as a pure state machine: where it stands, what it
still allows, whether it may be dispensed now, held, cancelled.

No transport, no SQL: the owning node reads a prescription's Progress in the unit of work
that locks its row, asks these functions, and writes what they allow in that same unit.

How dispensings count. A prescription allows 1 + renewals dispensings: the first, then
renewal 1..N. Each DispensePrescription is one whole dispensing: per line at most the
line's quantity (partial quantities and not-delivered lines are allowed, at least one line
given; what was not given of that dispensing is not carried over); the next call is the
next renewal, once the minimum interval after the last dispensing has elapsed.

Validity. The first dispensing happens before dispense_before; nothing is dispensed after
the treatment end (treatment_end, or 12 months after authoring when the prescriber gave
none). Past those times a prescription with something left is EXPIRED.

Refusals, in this order: CANCELLED; ALREADY_DISPENSED (everything dispensed, or an attempt
less than a day after the last dispensing while the next renewal is not due: that
dispensing was done, most likely the same prescription presented twice);
PRESCRIPTION_EXPIRED; HELD_BY_ANOTHER_PHARMACY (a live hold by someone else, never saying
who); RENEWAL_NOT_YET_DUE (with the time it is due); QUANTITY_EXCEEDED (a line beyond its
quantity).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime

from dmp.clock import from_us, to_us
from dmp.errors import FailedPrecondition, InvalidArgument
from dmp.fields import check_text
from dmp.prescriptions import (
    ALREADY_DISPENSED,
    CANCELLED,
    DISPENSABLE_STATUSES,
    HELD_BY_ANOTHER_PHARMACY,
    MAX_TREATMENT_MONTHS,
    PRESCRIPTION_EXPIRED,
    QUANTITY_EXCEEDED,
    RENEWAL_NOT_YET_DUE,
    add_months,
    check_line,
)
from dmp.v1 import prescription_pb2

DAY_US = 24 * 3600 * 1_000_000
#: A pharmacy holds a prescription this long by default, and at most this long.
DEFAULT_HOLD_S = 5 * 60
MAX_HOLD_S = 15 * 60
#: An idempotency key's length, in characters.
MIN_KEY, MAX_KEY = 8, 64
MAX_REASON = 500
#: Within the minimum interval, an attempt this soon after the last dispensing is refused
#: as ALREADY_DISPENSED (that dispensing was done), later as RENEWAL_NOT_YET_DUE.
SAME_DISPENSING_US = DAY_US

P = prescription_pb2


@dataclass(frozen=True, slots=True)
class Progress:
    """What happened to a prescription so far, as its owning node stores it."""

    #: How many dispensings were recorded.
    dispensed: int = 0
    last_dispensed_us: int | None = None
    cancelled_us: int | None = None
    #: Who holds it (the pharmacist's federation identity) and until when.
    holder: str | None = None
    held_until_us: int | None = None

    def holder_at(self, now_us: int) -> str | None:
        """The holder of a hold still live at `now_us`."""
        if (
            self.holder is not None
            and self.held_until_us is not None
            and now_us < self.held_until_us
        ):
            return self.holder
        return None


def _dt(us: int) -> str:
    return datetime.fromtimestamp(us / 1_000_000, UTC).strftime("%Y-%m-%d %H:%M UTC")


def end_us(prescription: P.Prescription) -> int:
    """After this time nothing is dispensed: the treatment end, or 12 months after authoring."""
    if prescription.HasField("treatment_end"):
        return to_us(prescription.treatment_end)
    authored = datetime.fromtimestamp(to_us(prescription.authored_time) / 1_000_000, UTC)
    return int(add_months(authored, MAX_TREATMENT_MONTHS).timestamp() * 1_000_000)


def allowed(prescription: P.Prescription) -> int:
    """How many dispensings the prescription allows: the first and each renewal."""
    return 1 + prescription.renewals


def status(
    prescription: P.Prescription, progress: Progress, now_us: int
) -> P.PrescriptionStatus.ValueType:
    """Where the prescription stands at `now_us`."""
    if progress.cancelled_us is not None:
        return P.PRESCRIPTION_STATUS_CANCELLED
    if progress.dispensed >= allowed(prescription):
        return P.PRESCRIPTION_STATUS_COMPLETED
    if now_us >= end_us(prescription) or (
        progress.dispensed == 0 and now_us >= to_us(prescription.dispense_before)
    ):
        return P.PRESCRIPTION_STATUS_EXPIRED
    if progress.dispensed == 0:
        return P.PRESCRIPTION_STATUS_ACTIVE
    return P.PRESCRIPTION_STATUS_PARTIALLY_DISPENSED


def next_dispensing_after(prescription: P.Prescription, progress: Progress) -> int | None:
    """The earliest time of the next dispensing, when one remains after an earlier one."""
    if progress.dispensed == 0 or progress.dispensed >= allowed(prescription):
        return None
    if progress.last_dispensed_us is None or progress.cancelled_us is not None:
        return None
    return progress.last_dispensed_us + prescription.min_interval_days * DAY_US


def state(
    prescription: P.Prescription,
    progress: Progress,
    now_us: int,
    caller: str,
    dispensations: Sequence[P.Dispensation] = (),
) -> P.PrescriptionState:
    """The state a reader is shown (`caller`: their federation identity, for held_by_caller)."""
    current = status(prescription, progress, now_us)
    open_ = current in DISPENSABLE_STATUSES
    out = P.PrescriptionState(
        status=current,
        dispensations=list(dispensations),
        remaining=[
            P.LineRemaining(line=index, quantity=line.quantity if open_ else 0)
            for index, line in enumerate(prescription.lines)
        ],
        renewals_remaining=max(0, allowed(prescription) - progress.dispensed - 1) if open_ else 0,
    )
    after = next_dispensing_after(prescription, progress)
    if open_ and after is not None:
        out.next_dispensing_after.CopyFrom(from_us(after))
    holder = progress.holder_at(now_us)
    if holder is not None and progress.held_until_us is not None:
        out.held_until.CopyFrom(from_us(progress.held_until_us))
        out.held_by_caller = holder == caller
    if progress.cancelled_us is not None:
        out.cancelled_time.CopyFrom(from_us(progress.cancelled_us))
    return out


def check_dispensable(
    prescription: P.Prescription, progress: Progress, now_us: int, caller: str
) -> int:
    """The dispensing `caller` may record now (0 for the first, n for renewal n), or
    FailedPrecondition with the reason a pharmacist's software acts on."""
    current = status(prescription, progress, now_us)
    rx = prescription.id
    if current == P.PRESCRIPTION_STATUS_CANCELLED:
        raise FailedPrecondition(
            f"prescription {rx} was cancelled by its prescriber"
            + (f" ({_dt(progress.cancelled_us)})" if progress.cancelled_us else "")
            + ": nothing more is dispensed",
            reason=CANCELLED,
        )
    if current == P.PRESCRIPTION_STATUS_COMPLETED:
        raise FailedPrecondition(
            f"prescription {rx} was already dispensed as often as it allows"
            f" ({progress.dispensed} time(s)): nothing remains",
            reason=ALREADY_DISPENSED,
        )
    after = next_dispensing_after(prescription, progress)
    last = progress.last_dispensed_us
    if (
        after is not None
        and last is not None
        and now_us < after
        and now_us < last + SAME_DISPENSING_US
    ):
        raise FailedPrecondition(
            f"prescription {rx} was already dispensed on {_dt(last)}; its next renewal is"
            f" due from {_dt(after)}",
            reason=ALREADY_DISPENSED,
        )
    if current == P.PRESCRIPTION_STATUS_EXPIRED:
        before = to_us(prescription.dispense_before)
        if progress.dispensed == 0 and now_us >= before:
            why = f"its first dispensing had to happen before {_dt(before)}"
        else:
            why = f"its treatment ended on {_dt(end_us(prescription))}"
        raise FailedPrecondition(
            f"prescription {rx} has expired: {why}; the patient needs a new prescription",
            reason=PRESCRIPTION_EXPIRED,
        )
    holder = progress.holder_at(now_us)
    if holder is not None and holder != caller:
        raise FailedPrecondition(
            f"prescription {rx} is held by another pharmacy while it prepares a dispensing"
            f" (until {_dt(progress.held_until_us or 0)} at most): try again later",
            reason=HELD_BY_ANOTHER_PHARMACY,
        )
    if after is not None and now_us < after:
        raise FailedPrecondition(
            f"prescription {rx}: renewal {progress.dispensed} is not due before {_dt(after)}"
            f" ({prescription.min_interval_days} days after the last dispensing)",
            reason=RENEWAL_NOT_YET_DUE,
        )
    return progress.dispensed


def check_dispensed_lines(
    prescription: P.Prescription, lines: Sequence[P.DispensedLine]
) -> list[P.DispensedLine]:
    """The lines of a dispensing, checked against the prescription: each line at most
    once, within its quantity (QUANTITY_EXCEEDED), a substitute only where allowed, a
    reason for a line not given, at least one line given. Lines left out are not
    delivered."""
    if not lines:
        raise InvalidArgument(
            "dispensation.lines: give at least one line (its index in the prescription and the"
            " quantity given, or 0 with not_delivered_reason)"
        )
    seen: set[int] = set()
    out = []
    for position, line in enumerate(lines):
        where = f"dispensation.lines[{position}]"
        if not 0 <= line.line < len(prescription.lines):
            raise InvalidArgument(
                f"{where}: line {line.line} is not a line of the prescription (0 to"
                f" {len(prescription.lines) - 1})"
            )
        if line.line in seen:
            raise InvalidArgument(f"{where}: line {line.line} is given twice")
        seen.add(line.line)
        prescribed = prescription.lines[line.line]
        check_text(line.not_delivered_reason, f"{where}.not_delivered_reason", MAX_REASON)
        if line.quantity < 0:
            raise InvalidArgument(f"{where}: quantity {line.quantity} is negative")
        if line.quantity == 0 and not line.not_delivered_reason.strip():
            raise InvalidArgument(
                f"{where}: a line not given (quantity 0) needs a not_delivered_reason"
            )
        if line.quantity > 0 and line.not_delivered_reason:
            raise InvalidArgument(f"{where}: a line given has no not_delivered_reason")
        if line.quantity > prescribed.quantity:
            raise FailedPrecondition(
                f"{where}: {line.quantity} {prescribed.unit or 'unit(s)'} of line"
                f" {line.line} exceed what this dispensing allows: at most"
                f" {prescribed.quantity}",
                reason=QUANTITY_EXCEEDED,
            )
        if line.HasField("substitute"):
            if not prescribed.substitution_allowed:
                raise InvalidArgument(
                    f"{where}: line {line.line} is not substitutable (the prescriber said so):"
                    " give the prescribed product"
                )
            check_line(
                P.PrescriptionLine(medication=line.substitute, quantity=1), f"{where}.substitute"
            )
        out.append(line)
    if not any(line.quantity > 0 for line in out):
        raise InvalidArgument(
            "dispensation.lines: a dispensing that gives nothing is not a dispensing: give at"
            " least one line a quantity (the prescription stays whole for another pharmacy)"
        )
    return out


def check_idempotency_key(key: str) -> str:
    if not MIN_KEY <= len(key) <= MAX_KEY or not key.isascii() or not key.isprintable():
        raise InvalidArgument(
            f"dispensation.idempotency_key must be {MIN_KEY} to {MAX_KEY} printable ASCII"
            " characters chosen by the pharmacy's software (a UUID will do), the same on a retry"
        )
    return key


def hold_us(hold_seconds: int) -> int:
    """How long a claim holds, in µs: 5 minutes by default, at most 15."""
    if hold_seconds < 0 or hold_seconds > MAX_HOLD_S:
        raise InvalidArgument(
            f"hold_seconds {hold_seconds} must be 0 (the default, {DEFAULT_HOLD_S // 60}"
            f" minutes) to {MAX_HOLD_S} ({MAX_HOLD_S // 60} minutes)"
        )
    return (hold_seconds or DEFAULT_HOLD_S) * 1_000_000


def claim(
    prescription: P.Prescription, progress: Progress, now_us: int, caller: str, hold_seconds: int
) -> Progress:
    """`caller` holds the prescription from now (extending their own hold), when it is
    dispensable now and no one else holds it."""
    duration = hold_us(hold_seconds)
    check_dispensable(prescription, progress, now_us, caller)
    return replace(progress, holder=caller, held_until_us=now_us + duration)


def release(prescription: P.Prescription, progress: Progress, now_us: int, caller: str) -> Progress:
    """`caller` gives up their hold; releasing what one does not hold changes nothing, but
    another's live hold is not theirs to end."""
    holder = progress.holder_at(now_us)
    if holder is None:
        return replace(progress, holder=None, held_until_us=None)
    if holder != caller:
        raise FailedPrecondition(
            f"prescription {prescription.id} is held by another pharmacy: only its holder"
            " releases it",
            reason=HELD_BY_ANOTHER_PHARMACY,
        )
    return replace(progress, holder=None, held_until_us=None)


def dispensed(progress: Progress, now_us: int) -> Progress:
    """The progress after one more dispensing: the holder's hold ends with it."""
    return replace(
        progress,
        dispensed=progress.dispensed + 1,
        last_dispensed_us=now_us,
        holder=None,
        held_until_us=None,
    )


def cancel(prescription: P.Prescription, progress: Progress, now_us: int) -> Progress:
    """Cancel the whole prescription while nothing was dispensed, or its remaining
    renewals after; cancelling twice keeps the first time. Nothing to cancel once all was
    dispensed (ALREADY_DISPENSED)."""
    if progress.cancelled_us is not None:
        return progress
    if progress.dispensed >= allowed(prescription):
        raise FailedPrecondition(
            f"prescription {prescription.id} was dispensed as often as it allows: nothing"
            " remains to cancel",
            reason=ALREADY_DISPENSED,
        )
    return replace(progress, cancelled_us=now_us, holder=None, held_until_us=None)


def check_cancel_reason(reason: str) -> str:
    return check_text(reason, "reason", MAX_REASON)
