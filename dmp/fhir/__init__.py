"""FHIR R4 (4.0.1) for hospital and practice software.

``systems``: the identifier systems and code systems, FR Core's among them, that every
FHIR view of the federation uses (the gateway, the audit's AuditEvent export). ``mapping``:
our records and identities as FHIR resources. ``bundles``: searchset Bundles and their
OperationOutcomes. ``errors``: gRPC statuses as HTTP statuses and OperationOutcomes, in one
place. ``gateway`` and ``serve``: the local gateway `dmp fhir serve` runs.
"""
