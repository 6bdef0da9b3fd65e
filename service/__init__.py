"""The gRPC edge: server, servicer, request validation, the bridge to the engine thread, the
Python client and the ``sluice`` command."""
