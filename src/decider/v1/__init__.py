"""Generated protobuf and gRPC stubs for decider.v1 (make proto); never edit by hand."""
