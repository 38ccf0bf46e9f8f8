"""gRPC adapters: one servicer per service, proto <-> core conversion, one error mapping."""
