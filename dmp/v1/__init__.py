"""Generated stubs of the dmp.v1 contract (make proto)."""
