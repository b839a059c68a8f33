"""DMP federation: shared library (contract stubs, PKI, identities, TLS, storage helpers, CLI)."""
