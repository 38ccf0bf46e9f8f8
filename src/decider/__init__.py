"""Decider: routing decisions for LLM gateways over gRPC."""

__version__ = "0.1.0"
