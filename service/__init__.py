"""The gRPC edge: server, servicer, request validation, the bridge to the engine (a thread or a
process of its own), the Python client and the ``sluice`` command."""
