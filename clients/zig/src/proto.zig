//! Zig values <-> protobuf-c messages <-> bytes. Encoding borrows an arena for
//! the NUL-terminated copies protobuf-c needs; decoding copies into the
//! Decision's own arena so the C message is freed at once.
const std = @import("std");
const c = @import("c");
const model = @import("model.zig");

const Allocator = std.mem.Allocator;

fn cstr(arena: Allocator, s: []const u8) Allocator.Error![*c]u8 {
    return (try arena.dupeSentinel(u8, s, 0)).ptr;
}

fn cstrs(arena: Allocator, items: []const []const u8) Allocator.Error![*c][*c]u8 {
    const out = try arena.alloc([*c]u8, items.len);
    for (items, out) |s, *o| o.* = try cstr(arena, s);
    return out.ptr;
}

fn fillDecide(arena: Allocator, req: model.DecideRequest, m: *c.Decider__V1__DecideRequest) Allocator.Error!void {
    c.decider__v1__decide_request__init(m);
    m.request_id = try cstr(arena, req.request_id);
    m.model = try cstr(arena, req.model);
    m.session_id = try cstr(arena, req.session_id);
    m.tenant = try cstr(arena, req.tenant);
    m.n_required_capabilities = req.required_capabilities.len;
    m.required_capabilities = try cstrs(arena, req.required_capabilities);
    m.estimated_input_tokens = req.estimated_input_tokens;
    m.n_prefix_hashes = req.prefix_hashes.len;
    m.prefix_hashes = @constCast(req.prefix_hashes.ptr);
    m.n_exclude_endpoint_ids = req.exclude_endpoint_ids.len;
    m.exclude_endpoint_ids = try cstrs(arena, req.exclude_endpoint_ids);
    m.strategy = try cstr(arena, req.strategy);
    m.max_fallbacks = req.max_fallbacks;
}

fn packed_(arena: Allocator, comptime T: type, m: *const T, comptime size_fn: anytype, comptime pack_fn: anytype) Allocator.Error![]u8 {
    const buf = try arena.alloc(u8, size_fn(m));
    _ = pack_fn(m, buf.ptr);
    return buf;
}

pub fn encodeDecide(arena: Allocator, req: model.DecideRequest) Allocator.Error![]u8 {
    var m: c.Decider__V1__DecideRequest = undefined;
    try fillDecide(arena, req, &m);
    return packed_(arena, c.Decider__V1__DecideRequest, &m, c.decider__v1__decide_request__get_packed_size, c.decider__v1__decide_request__pack);
}

pub fn encodeStreamDecide(arena: Allocator, correlation_id: u64, req: model.DecideRequest) Allocator.Error![]u8 {
    var inner: c.Decider__V1__DecideRequest = undefined;
    try fillDecide(arena, req, &inner);
    var m: c.Decider__V1__DecideStreamRequest = undefined;
    c.decider__v1__decide_stream_request__init(&m);
    m.correlation_id = correlation_id;
    m.decide = &inner;
    return packed_(arena, c.Decider__V1__DecideStreamRequest, &m, c.decider__v1__decide_stream_request__get_packed_size, c.decider__v1__decide_stream_request__pack);
}

fn duration(ns: u64, d: *c.Google__Protobuf__Duration) *c.Google__Protobuf__Duration {
    c.google__protobuf__duration__init(d);
    d.seconds = @intCast(ns / std.time.ns_per_s);
    d.nanos = @intCast(ns % std.time.ns_per_s);
    return d;
}

pub fn encodeOutcome(arena: Allocator, o: model.Outcome) Allocator.Error![]u8 {
    var m: c.Decider__V1__ReportOutcomeRequest = undefined;
    c.decider__v1__report_outcome_request__init(&m);
    m.decision_id = try cstr(arena, o.decision_id);
    m.endpoint_id = try cstr(arena, o.endpoint_id);
    m.result = @intCast(@intFromEnum(o.result));
    var latency: c.Google__Protobuf__Duration = undefined;
    var ttft: c.Google__Protobuf__Duration = undefined;
    if (o.latency_ns > 0) m.latency = duration(o.latency_ns, &latency);
    if (o.ttft_ns > 0) m.time_to_first_token = duration(o.ttft_ns, &ttft);
    m.input_tokens = o.input_tokens;
    m.output_tokens = o.output_tokens;
    return packed_(arena, c.Decider__V1__ReportOutcomeRequest, &m, c.decider__v1__report_outcome_request__get_packed_size, c.decider__v1__report_outcome_request__pack);
}

pub fn encodeWatch(arena: Allocator, model_name: []const u8) Allocator.Error![]u8 {
    var m: c.Decider__V1__WatchHealthRequest = undefined;
    c.decider__v1__watch_health_request__init(&m);
    m.model = try cstr(arena, model_name);
    return packed_(arena, c.Decider__V1__WatchHealthRequest, &m, c.decider__v1__watch_health_request__get_packed_size, c.decider__v1__watch_health_request__pack);
}

fn span(p: [*c]const u8) []const u8 {
    return if (p == null) "" else std.mem.span(@as([*:0]const u8, @ptrCast(p)));
}

fn copyEndpoint(a: Allocator, ep: ?*const c.Decider__V1__Endpoint) Allocator.Error!model.Endpoint {
    const e = ep orelse return .{ .id = "", .address = "", .model = "" };
    const caps = try a.alloc([]const u8, e.n_capabilities);
    for (caps, 0..) |*cap, i| cap.* = try a.dupe(u8, span(e.capabilities[i]));
    return .{
        .id = try a.dupe(u8, span(e.id)),
        .address = try a.dupe(u8, span(e.address)),
        .model = try a.dupe(u8, span(e.model)),
        .capabilities = caps,
        .weight = e.weight,
    };
}

fn durationMs(d: ?*const c.Google__Protobuf__Duration) u64 {
    const v = d orelse return 0;
    if (v.seconds < 0 or v.nanos < 0) return 0;
    return @as(u64, @intCast(v.seconds)) * 1000 + @as(u64, @intCast(v.nanos)) / 1_000_000;
}

/// Copies a DecideResponse into a Decision whose memory comes from `a` (its `arena` is left for the caller).
fn decision(a: Allocator, r: *const c.Decider__V1__DecideResponse) Allocator.Error!model.Decision {
    const fallbacks = try a.alloc(model.Endpoint, r.n_fallbacks);
    for (fallbacks, 0..) |*f, i| f.* = try copyEndpoint(a, r.fallbacks[i]);
    const scores = try a.alloc(model.Score, r.n_scores);
    for (scores, 0..) |*s, i| s.* = .{ .name = try a.dupe(u8, span(r.scores[i].*.key)), .value = r.scores[i].*.value };
    var retry: model.RetryAdvice = .{};
    if (r.retry) |p| retry = .{
        .max_attempts = p.*.max_attempts,
        .initial_backoff_ms = durationMs(p.*.initial_backoff),
        .max_backoff_ms = durationMs(p.*.max_backoff),
        .backoff_multiplier = p.*.backoff_multiplier,
    };
    return .{
        .arena = undefined,
        .id = try a.dupe(u8, span(r.decision_id)),
        .endpoint = try copyEndpoint(a, r.endpoint),
        .fallbacks = fallbacks,
        .reason = try a.dupe(u8, span(r.reason)),
        .strategy = try a.dupe(u8, span(r.strategy)),
        .scores = scores,
        .retry = retry,
        .affinity_hit = r.affinity_hit != 0,
        .candidate_count = r.candidate_count,
    };
}

/// Decodes DecideResponse bytes; null when they do not parse.
pub fn decodeDecision(gpa: Allocator, bytes: []const u8) Allocator.Error!?model.Decision {
    const r = c.decider__v1__decide_response__unpack(null, bytes.len, bytes.ptr) orelse return null;
    defer c.decider__v1__decide_response__free_unpacked(r, null);
    return try decisionOwned(gpa, r);
}

/// Copies a DecideResponse into a Decision that owns its memory: `Decision.deinit` frees it.
pub fn decisionOwned(gpa: Allocator, r: *const c.Decider__V1__DecideResponse) Allocator.Error!model.Decision {
    var arena = std.heap.ArenaAllocator.init(gpa);
    errdefer arena.deinit();
    var d = try decision(arena.allocator(), r);
    d.arena = arena;
    return d;
}
