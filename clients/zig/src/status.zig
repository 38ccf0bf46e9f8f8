//! gRPC status to Zig errors, in one place. A call that ends badly fills a
//! `Failure` (code, message, ErrorInfo reason, RetryInfo delay) and returns the
//! error `errorFor` picks; callers never see C types.
const std = @import("std");

/// The gRPC status codes (google.rpc.Code).
pub const Code = enum(u32) {
    ok = 0,
    cancelled = 1,
    unknown = 2,
    invalid_argument = 3,
    deadline_exceeded = 4,
    not_found = 5,
    already_exists = 6,
    permission_denied = 7,
    resource_exhausted = 8,
    failed_precondition = 9,
    aborted = 10,
    out_of_range = 11,
    unimplemented = 12,
    internal = 13,
    unavailable = 14,
    data_loss = 15,
    unauthenticated = 16,
    _,
};

/// ErrorInfo reasons Decider sets (README, "Status codes").
pub const reason_no_healthy_endpoint = "NO_HEALTHY_ENDPOINT";
pub const reason_shutting_down = "SHUTTING_DOWN";
pub const reason_server_overloaded = "SERVER_OVERLOADED";

/// Every way a Decider call can fail, as the caller sees it.
pub const Error = error{
    /// NOT_FOUND: no endpoint serves the model.
    NotFound,
    /// INVALID_ARGUMENT: the request is malformed or out of range.
    InvalidArgument,
    /// UNAVAILABLE with ErrorInfo NO_HEALTHY_ENDPOINT: Decider answered, and no endpoint is usable.
    NoHealthyEndpoint,
    /// RESOURCE_EXHAUSTED for the tenant (over quota); `Failure.retry_after_ms` says when to retry.
    QuotaExceeded,
    /// UNAUTHENTICATED or PERMISSION_DENIED (RegistryService without the admin token).
    PermissionDenied,
    /// Any other status Decider answered with (FAILED_PRECONDITION, UNIMPLEMENTED, ...).
    Rejected,
    /// Decider could not answer: the connection failed, the deadline passed, the
    /// server is draining or overloaded, or a hop in between broke. With fail-open
    /// on, Decide only returns this when no last known healthy endpoint fits.
    DeciderUnreachable,
    OutOfMemory,
};

/// What the last failed call said, for logs and HTTP answers. Fixed-size: filling it never allocates.
pub const Failure = struct {
    code: Code = .ok,
    retry_after_ms: u64 = 0,
    message_buf: [256]u8 = undefined,
    message_len: usize = 0,
    reason_buf: [64]u8 = undefined,
    reason_len: usize = 0,

    pub fn message(f: *const Failure) []const u8 {
        return f.message_buf[0..f.message_len];
    }

    pub fn reason(f: *const Failure) []const u8 {
        return f.reason_buf[0..f.reason_len];
    }

    pub fn setMessage(f: *Failure, msg: []const u8) void {
        f.message_len = @min(msg.len, f.message_buf.len);
        @memcpy(f.message_buf[0..f.message_len], msg[0..f.message_len]);
    }

    pub fn setReason(f: *Failure, r: []const u8) void {
        f.reason_len = @min(r.len, f.reason_buf.len);
        @memcpy(f.reason_buf[0..f.reason_len], r[0..f.reason_len]);
    }

    pub fn set(f: *Failure, code: Code, msg: []const u8) void {
        f.* = .{ .code = code };
        f.setMessage(msg);
    }
};

/// Whether a failure means Decider itself could not answer, as opposed to
/// answering with a refusal about the request (clients/go `Unreachable`).
pub fn unreachable_(f: *const Failure) bool {
    return switch (f.code) {
        // Transport failures carry no ErrorInfo; only NO_HEALTHY_ENDPOINT is an answer.
        .unavailable => !std.mem.eql(u8, f.reason(), reason_no_healthy_endpoint),
        // A tenant over quota is an answer; a server out of capacity is not.
        .resource_exhausted => std.mem.eql(u8, f.reason(), reason_server_overloaded),
        // Cancelled here comes from the transport; Unknown and Internal from a broken hop.
        .deadline_exceeded, .cancelled, .unknown, .internal => true,
        else => false,
    };
}

/// The one mapping from a failed status to the Zig error callers handle.
pub fn errorFor(f: *const Failure) Error {
    if (unreachable_(f)) return error.DeciderUnreachable;
    return switch (f.code) {
        .not_found => error.NotFound,
        .invalid_argument, .out_of_range => error.InvalidArgument,
        .unavailable => error.NoHealthyEndpoint,
        .resource_exhausted => error.QuotaExceeded,
        .unauthenticated, .permission_denied => error.PermissionDenied,
        else => error.Rejected,
    };
}

test "every status Decider sends maps to its error" {
    const cases = [_]struct { code: Code, reason: []const u8, want: Error }{
        .{ .code = .not_found, .reason = "MODEL_NOT_FOUND", .want = error.NotFound },
        .{ .code = .invalid_argument, .reason = "", .want = error.InvalidArgument },
        .{ .code = .unavailable, .reason = reason_no_healthy_endpoint, .want = error.NoHealthyEndpoint },
        .{ .code = .unavailable, .reason = "", .want = error.DeciderUnreachable },
        .{ .code = .unavailable, .reason = reason_shutting_down, .want = error.DeciderUnreachable },
        .{ .code = .resource_exhausted, .reason = "QUOTA_EXHAUSTED", .want = error.QuotaExceeded },
        .{ .code = .resource_exhausted, .reason = "", .want = error.QuotaExceeded },
        .{ .code = .resource_exhausted, .reason = reason_server_overloaded, .want = error.DeciderUnreachable },
        .{ .code = .deadline_exceeded, .reason = "", .want = error.DeciderUnreachable },
        .{ .code = .cancelled, .reason = "", .want = error.DeciderUnreachable },
        .{ .code = .internal, .reason = "", .want = error.DeciderUnreachable },
        .{ .code = .unknown, .reason = "", .want = error.DeciderUnreachable },
        .{ .code = .unauthenticated, .reason = "UNAUTHENTICATED", .want = error.PermissionDenied },
        .{ .code = .failed_precondition, .reason = "", .want = error.Rejected },
    };
    for (cases) |case| {
        var f: Failure = .{};
        f.set(case.code, "m");
        f.setReason(case.reason);
        try std.testing.expectEqual(case.want, errorFor(&f));
    }
}
