"""How a consolidated view, an access history and tables read on a terminal: shared by the
CLI and the demo."""

from __future__ import annotations

from collections.abc import Sequence

from dmp.records import KIND_NAMES
from dmp.regions import REGION_STATE_NAMES
from dmp.v1 import directory_service_pb2 as pb
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
