"""How a consolidated view, an access history and tables read on a terminal: shared by the
CLI and the demo."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from google.protobuf.timestamp_pb2 import Timestamp

from dmp.prescriptions import CIP13_SYSTEM, STATUS_NAMES, SUBSTANCE_SYSTEM, UCD_SYSTEM
from dmp.records import KIND_NAMES
from dmp.regions import REGION_STATE_NAMES
from dmp.v1 import directory_service_pb2 as pb
from dmp.v1 import prescription_pb2 as rx_pb2
from dmp.v1 import record_pb2


def print_table(rows: Sequence[Sequence[str]]) -> None:
    """Print rows (the first is the header) as aligned columns."""
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    for row in rows:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        )


def print_view(records: list[record_pb2.Record], regions: dict[str, pb.RegionStatus]) -> None:
    rows = [("DATE", "REGION", "KIND", "TYPE", "TITLE", "AUTHOR")]
    rows += [
        (
            r.effective_time.ToDatetime().date().isoformat(),
            r.region,
            KIND_NAMES.get(r.kind, "?"),
            r.type_code.code,
            r.title + (" [masked]" if r.masked else ""),
            r.author.name or r.author.identity,
        )
        for r in records
    ]
    if records:
        print_table(rows)
    else:
        print("no records")
    print()
    for status in sorted(regions.values(), key=lambda s: s.region):
        state = REGION_STATE_NAMES.get(status.state, "unknown")
        detail = (
            f" ({status.record_count} records)"
            if status.state == pb.REGION_STATE_ANSWERED
            else f": {status.message}"
        )
        print(f"region {status.region}: {state}{detail}")


def print_history(answer: pb.GetAccessHistoryResponse) -> None:
    rows = [("WHEN (UTC)", "WHO", "PROFESSION", "WHERE", "WHAT", "WHY", "OUTCOME")]
    for e in answer.events:
        why = e.purpose_of_use or "-"
        if e.purpose_of_use == "EMERGENCY":
            why = f"EMERGENCY: {e.emergency_reason}"
        what = e.event_type
        if e.participant_object_record_ids:
            what += f" ({len(e.participant_object_record_ids)} records)"
        if e.repeat_count > 1:  # identical refusals counted into one event
            what += f" x{e.repeat_count}"
        rows.append(
            (
                e.event_date_time.ToDatetime().strftime("%Y-%m-%d %H:%M:%S"),
                e.active_participant_user_name or e.active_participant_user_id,
                e.active_participant_role or "-",
                f"region {e.audit_source_region}" if e.audit_source_region else "directory",
                what,
                why,
                e.status_code,
            )
        )
    if answer.events:
        print_table(rows)
    else:
        print("no access recorded")
    for status in answer.regions:
        if status.state != pb.REGION_STATE_ANSWERED:
            print(
                f"region {status.region}: {REGION_STATE_NAMES.get(status.state)}: {status.message}"
            )


# -- prescriptions ---------------------------------------------------------------------------


def _when(stamp: Timestamp) -> str:
    return stamp.ToDatetime().strftime("%Y-%m-%d %H:%M UTC")


def _day(stamp: Timestamp) -> str:
    return stamp.ToDatetime().date().isoformat()


#: How a medication's code system is named when it has no display.
_SYSTEM_NAMES = {CIP13_SYSTEM: "CIP 13", UCD_SYSTEM: "UCD", SUBSTANCE_SYSTEM: "substance"}


def medication_text(medication: rx_pb2.Medication) -> str:
    code = medication.code
    if not code.display:
        return f"{_SYSTEM_NAMES.get(code.system, code.system)} {code.code}"
    return f"{code.display} [{code.code}]" if code.code else code.display


def line_text(line: rx_pb2.PrescriptionLine) -> str:
    """How a prescription line reads: product, quantity, and how to take it."""
    how = ", ".join(part for part in (line.dose, line.route, line.frequency, line.duration) if part)
    unit = f" x {line.unit}" if line.unit else ""
    text = f"{medication_text(line.medication)}: {line.quantity}{unit} per dispensing"
    if how:
        text += f"; {how}"
    if not line.substitution_allowed:
        text += "; not substitutable"
    if line.instructions:
        text += f"; {line.instructions}"
    return text


def print_prescription(
    prescription: rx_pb2.Prescription, stored: rx_pb2.StoredPrescription, signature: str
) -> None:
    """A prescription as a pharmacist reads it: who wrote it, its signature (`signature`
    says what its verification found), each line with what remains, its dispensings."""
    state = stored.state
    prescriber = prescription.prescriber
    print(f"prescription {prescription.id} (held by region {stored.region})")
    print(f"  patient      {prescription.patient_ins}")
    print(
        f"  prescriber   {prescriber.name} ({prescriber.profession}, RPPS {prescriber.rpps})"
        + (f", {prescriber.organization}" if prescriber.organization else "")
    )
    print(f"  signature    {signature}")
    validity = f"first dispensing before {_day(prescription.dispense_before)}"
    if prescription.HasField("treatment_end"):
        validity += f", treatment ends {_day(prescription.treatment_end)}"
    print(f"  written      {_when(prescription.authored_time)}; {validity}")
    interval = (
        f", at least {prescription.min_interval_days} days apart"
        if prescription.min_interval_days
        else ""
    )
    print(f"  renewals     {prescription.renewals}{interval}")
    status = STATUS_NAMES.get(state.status, "unknown")
    if state.HasField("cancelled_time"):
        status += f" ({_when(state.cancelled_time)})"
    print(f"  status       {status}")
    remaining = {r.line: r.quantity for r in state.remaining}
    for index, line in enumerate(prescription.lines):
        left = remaining.get(index)
        tail = f"  -> {left} left at the next dispensing" if left is not None else ""
        print(f"  line {index}       {line_text(line)}{tail}")
    for dispensation in state.dispensations:
        print(f"  dispensed    {dispensation_text(dispensation)}")
    print(f"  next         {next_text(stored)}")
    if state.HasField("held_until"):
        who = "you" if state.held_by_caller else "another pharmacy"
        print(f"  held         by {who} until {_when(state.held_until)}")


def state_text(stored: rx_pb2.StoredPrescription) -> str:
    """Where a prescription stands and what its next dispensing allows, in one line."""
    status = STATUS_NAMES.get(stored.state.status, "unknown")
    if stored.state.status not in (
        rx_pb2.PRESCRIPTION_STATUS_ACTIVE,
        rx_pb2.PRESCRIPTION_STATUS_PARTIALLY_DISPENSED,
    ):
        return f"{status}: {next_text(stored)}"
    return f"{status}; next: {next_text(stored)}"


def next_text(stored: rx_pb2.StoredPrescription) -> str:
    """What the next dispensing of a prescription allows, and from when."""
    state = stored.state
    if state.status not in (
        rx_pb2.PRESCRIPTION_STATUS_ACTIVE,
        rx_pb2.PRESCRIPTION_STATUS_PARTIALLY_DISPENSED,
    ):
        return "nothing more to dispense"
    done = len(state.dispensations)
    which = "first dispensing" if done == 0 else f"renewal {done}"
    left = ", ".join(f"line {r.line} x{r.quantity}" for r in state.remaining) or "nothing"
    when = (
        f" from {_when(state.next_dispensing_after)}"
        if state.HasField("next_dispensing_after")
        else ""
    )
    return f"{which} ({left}){when}, then {state.renewals_remaining} more renewal(s)"


def dispensation_text(dispensation: rx_pb2.Dispensation) -> str:
    which = "first" if dispensation.dispensing == 0 else f"renewal {dispensation.dispensing}"
    parts = []
    for line in dispensation.lines:
        if line.not_delivered_reason:
            parts.append(f"line {line.line} not delivered ({line.not_delivered_reason})")
            continue
        text = f"line {line.line} x{line.quantity}"
        if line.HasField("substitute"):
            text += f" as {medication_text(line.substitute)}"
        parts.append(text)
    who = dispensation.pharmacist_name or dispensation.pharmacist_rpps
    return (
        f"{_when(dispensation.time)} {which} by {who} (RPPS {dispensation.pharmacist_rpps}),"
        f" {dispensation.pharmacy}: {', '.join(parts)}"
    )


def print_prescriptions(
    found: Sequence[tuple[rx_pb2.Prescription, rx_pb2.StoredPrescription]],
    regions: Mapping[str, pb.RegionStatus],
) -> None:
    """A patient's prescriptions, newest first, and how each region answered."""
    rows = [("ID", "WRITTEN", "REGION", "PRESCRIBER", "STATUS", "LINES")]
    for prescription, stored in found:
        rows.append(
            (
                prescription.id,
                _day(prescription.authored_time),
                stored.region,
                prescription.prescriber.name or prescription.prescriber.rpps,
                STATUS_NAMES.get(stored.state.status, "unknown"),
                "; ".join(medication_text(line.medication) for line in prescription.lines),
            )
        )
    if found:
        print_table(rows)
    else:
        print("no prescriptions")
    for status in sorted(regions.values(), key=lambda s: s.region):
        state = REGION_STATE_NAMES.get(status.state, "unknown")
        detail = (
            f" ({status.record_count} prescriptions)"
            if status.state == pb.REGION_STATE_ANSWERED
            else f": {status.message}"
        )
        print(f"region {status.region}: {state}{detail}")
