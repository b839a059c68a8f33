"""The regional record node: storage, access check, gRPC servicer."""
