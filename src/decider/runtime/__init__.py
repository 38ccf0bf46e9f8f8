"""The running process: the grpc.aio server's lifecycle, the event loop, the demo."""
