"""FHIR R4 (4.0.1) for hospital and practice software.

``systems``: the identifier systems and code systems, FR Core's among them, that every
FHIR view of the federation uses (the gateway, the audit's AuditEvent export). The mapping,
both ways: ``mapping`` (records and identities as resources, from their metadata),
``medication`` (prescriptions and dispensations as MedicationRequest and MedicationDispense,
read from what ``dmp/prescription_fhir.py`` built), ``everything`` (each record as its
natural resource; the export Bundle), ``inbound`` (resources of a transaction Bundle as
records). ``transaction``: ITI-65 Bundles checked whole and stored all or nothing.
``bundles``: searchset Bundles and their OperationOutcomes. ``errors``: gRPC statuses as HTTP
statuses and OperationOutcomes, in one place. ``gateway`` and ``serve``: the local gateway
`dmp fhir serve` runs; ``files``: `dmp fhir import` and `dmp fhir export`.
"""
