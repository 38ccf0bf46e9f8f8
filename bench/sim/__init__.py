"""A discrete-event cluster simulator that drives the real decision core.

Simulated continuous-batching model servers (bench.sim.server) with prefix caches
(bench.sim.cache) serve workloads (bench.sim.workloads) routed by decider's Engine through a
simulated gateway and prober (bench.sim.cluster). Everything runs on simulated time from one
seed, so the same seed gives the same numbers on any machine.
"""
