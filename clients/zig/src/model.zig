//! Zig-native values the client hands to and gets from callers: requests,
//! decisions, outcomes, health. Nothing here refers to C or protobuf types.
const std = @import("std");

pub const Endpoint = struct {
    id: []const u8,
    /// host:port the gateway dials.
    address: []const u8,
    model: []const u8,
    capabilities: []const []const u8 = &.{},
    weight: u32 = 0,
};

pub const DecideRequest = struct {
    model: []const u8,
    request_id: []const u8 = "",
    session_id: []const u8 = "",
    tenant: []const u8 = "",
    required_capabilities: []const []const u8 = &.{},
    estimated_input_tokens: u32 = 0,
    /// docs/PREFIX_HASH.md; `prefix.hashes` computes them from a request body.
    prefix_hashes: []const u64 = &.{},
    /// Endpoints not to choose, for example ones that already failed this request.
    exclude_endpoint_ids: []const []const u8 = &.{},
    /// Strategy wire name; empty means the server's default.
    strategy: []const u8 = "",
    /// 0 means the server's default.
    max_fallbacks: u32 = 0,
};

/// How the gateway should retry across the endpoint and its fallbacks.
pub const RetryAdvice = struct {
    /// Total attempts, the first included; 0 when the decision carried no policy.
    max_attempts: u32 = 0,
    initial_backoff_ms: u64 = 0,
    max_backoff_ms: u64 = 0,
    backoff_multiplier: f64 = 0,
};

pub const Score = struct {
    name: []const u8,
    value: f64,
};

/// Where to send a request: `endpoint` first, then `fallbacks` in order. Owns
/// its memory; `deinit` frees it.
pub const Decision = struct {
    arena: std.heap.ArenaAllocator,
    /// Goes back in ReportOutcome; empty for fail-open decisions.
    id: []const u8,
    endpoint: Endpoint,
    fallbacks: []const Endpoint,
    reason: []const u8,
    strategy: []const u8,
    scores: []const Score,
    retry: RetryAdvice,
    affinity_hit: bool = false,
    candidate_count: u32 = 0,
    /// Decider was unreachable and the client chose from the last known healthy endpoints.
    fail_open: bool = false,

    pub fn deinit(d: *Decision) void {
        d.arena.deinit();
    }

    pub fn score(d: *const Decision, name: []const u8) ?f64 {
        for (d.scores) |s| if (std.mem.eql(u8, s.name, name)) return s.value;
        return null;
    }
};

pub const Result = enum(u32) {
    success = 1,
    @"error" = 2,
    timeout = 3,
    /// The endpoint answered 429.
    rate_limited = 4,
    /// The caller gave up: frees the decision's in-flight slot without charging the endpoint.
    cancelled = 5,
};

/// How one attempt at one endpoint went.
pub const Outcome = struct {
    decision_id: []const u8,
    endpoint_id: []const u8,
    result: Result,
    latency_ns: u64 = 0,
    input_tokens: u32 = 0,
    output_tokens: u32 = 0,
    /// Time to first token for streaming responses; 0 when unknown.
    ttft_ns: u64 = 0,
};

pub const HealthStatus = enum(u32) { unspecified = 0, healthy = 1, degraded = 2, unhealthy = 3, draining = 4, _ };
pub const BreakerState = enum(u32) { unspecified = 0, closed = 1, open = 2, half_open = 3, _ };

/// The last health Decider published for one endpoint. `reason` is only valid
/// until the next view change; copy it to keep it.
pub const HealthView = struct {
    status: HealthStatus,
    breaker: BreakerState,

    /// Mirrors Decider's own filter: unhealthy, draining and breaker-open are out; unknown is usable.
    pub fn usable(h: HealthView) bool {
        return switch (h.status) {
            .unhealthy, .draining => false,
            else => h.breaker != .open,
        };
    }
};
