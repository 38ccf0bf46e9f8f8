"""The public API's messages (decider.v1) <-> core values, and their validation. Shared by the gRPC
adapters and by programs that speak the API as clients (the standalone prober, the CLI tools)."""
