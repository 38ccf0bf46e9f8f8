//! Decider's Zig client: ask Decider where to send each LLM request, report how
//! it went, keep a local health view, and fail open when Decider is down.
//!
//!     const decider = @import("decider");
//!     const client = try decider.Client.init(gpa, io, "127.0.0.1:50051", .{ .fail_open = true, .watch = true });
//!     defer client.deinit();
//!     var d = try client.decide(.{ .model = "llama-3-8b" }, null);
//!     defer d.deinit();
//!     client.reportOutcome(.{ .decision_id = d.id, .endpoint_id = d.endpoint.id, .result = .success });
const std = @import("std");

pub const Client = @import("client.zig").Client;
pub const Options = @import("client.zig").Options;
pub const Stats = @import("client.zig").Stats;
pub const Error = @import("status.zig").Error;
pub const Failure = @import("status.zig").Failure;
pub const StatusCode = @import("status.zig").Code;
pub const Tls = @import("grpc.zig").Tls;
pub const Credentials = @import("grpc.zig").Credentials;

pub const Endpoint = @import("model.zig").Endpoint;
pub const DecideRequest = @import("model.zig").DecideRequest;
pub const Decision = @import("model.zig").Decision;
pub const RetryAdvice = @import("model.zig").RetryAdvice;
pub const Score = @import("model.zig").Score;
pub const Outcome = @import("model.zig").Outcome;
pub const Result = @import("model.zig").Result;
pub const HealthView = @import("model.zig").HealthView;
pub const HealthStatus = @import("model.zig").HealthStatus;
pub const BreakerState = @import("model.zig").BreakerState;

pub const prefix = @import("prefix.zig");

/// Monotonic nanoseconds (the C core's clock), for latencies and TTFT.
pub const nowNs = @import("grpc.zig").nowNs;

test {
    std.testing.refAllDecls(@This());
    _ = @import("status.zig");
    _ = @import("view.zig");
    _ = @import("proto.zig");
    _ = @import("stream.zig");
}
