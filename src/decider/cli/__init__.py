"""Command-line entry points: `decider` (serve, check-config, endpoints, decide) and
`decider-probe`."""
