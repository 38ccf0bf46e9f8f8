//! The example gateway end to end: the built decider-gateway binary in front of
//! the real Decider and real backends, one of them dead.
const std = @import("std");
const harness = @import("harness.zig");
const live_options = @import("live_options");

const testing = std.testing;
const gpa = testing.allocator;
const io = testing.io;
const http = std.http;

const Reply = struct {
    status: u16,
    endpoint: []u8,
    attempts: []u8,
    content_type: []u8,
    body: []u8,

    fn deinit(r: Reply) void {
        gpa.free(r.endpoint);
        gpa.free(r.attempts);
        gpa.free(r.content_type);
        gpa.free(r.body);
    }
};

fn post(client: *http.Client, url: []const u8, body: []const u8) !Reply {
    var req = try client.request(.POST, try std.Uri.parse(url), .{
        .redirect_behavior = .unhandled,
        .headers = .{ .content_type = .{ .override = "application/json" } },
        .extra_headers = &.{.{ .name = "x-session-id", .value = "s-1" }},
    });
    defer req.deinit();
    try req.sendBodyComplete(@constCast(body));
    var resp = try req.receiveHead(&.{});
    var r: Reply = .{ .status = @intFromEnum(resp.head.status), .endpoint = &.{}, .attempts = &.{}, .content_type = &.{}, .body = &.{} };
    errdefer r.deinit();
    var it = resp.head.iterateHeaders();
    while (it.next()) |h| {
        if (std.ascii.eqlIgnoreCase(h.name, "x-decider-endpoint")) r.endpoint = try gpa.dupe(u8, h.value);
        if (std.ascii.eqlIgnoreCase(h.name, "x-decider-attempts")) r.attempts = try gpa.dupe(u8, h.value);
        if (std.ascii.eqlIgnoreCase(h.name, "content-type")) r.content_type = try gpa.dupe(u8, h.value);
    }
    var buf: [4096]u8 = undefined;
    r.body = try resp.reader(&buf).allocRemaining(gpa, .limited(1 << 20));
    return r;
}

const chat_body =
    \\{"model":"m","messages":[{"role":"system","content":"You are a support assistant for Acme Corp. Answer briefly, cite the manual section."},{"role":"user","content":"How do I reset my router?"}]}
;
const chat_stream_body =
    \\{"model":"m","stream":true,"messages":[{"role":"user","content":"hi"}]}
;

test "example gateway: JSON and SSE through Decider, a dead backend retried on a fallback" {
    // "dead" refuses connections and has no health_url, so only the gateway's
    // own attempts can find out: as when a backend dies between two probes.
    var dead_buf: [32]u8 = undefined;
    const dead = try harness.deadAddress(io, &dead_buf);
    const extra = try std.fmt.allocPrint(gpa, "\n[[endpoints]]\nid = \"dead\"\naddress = \"{s}\"\nmodel = \"m\"\n", .{dead});
    defer gpa.free(extra);
    const cl = try harness.Cluster.start(gpa, io, &.{ "a", "b" }, extra);
    defer cl.stop();

    const guard = try cl.testFile("guarded.py");
    defer gpa.free(guard);
    var gw: harness.Proc = undefined;
    try gw.start(io, &.{ cl.py, guard, live_options.gateway_exe, "--listen", "127.0.0.1:0", "--decider", cl.addr, "--decide-timeout-ms", "5000" }, .stdout, "listening on http://127.0.0.1:");
    defer gw.kill();
    const base = try std.fmt.allocPrint(gpa, "http://127.0.0.1:{d}/v1/chat/completions", .{gw.port});
    defer gpa.free(base);

    var client: http.Client = .{ .allocator = gpa, .io = io };
    defer client.deinit();

    // Round robin over a, b and dead: every third request meets the dead one first.
    var retried: usize = 0;
    for (0..6) |_| {
        const r = try post(&client, base, chat_body);
        defer r.deinit();
        try testing.expectEqual(200, r.status);
        try testing.expect(std.mem.eql(u8, r.endpoint, "a") or std.mem.eql(u8, r.endpoint, "b"));
        try testing.expect(std.mem.indexOf(u8, r.body, "\"hi from ") != null);
        try testing.expect(std.mem.indexOf(u8, r.body, "\"prompt_tokens\": 21") != null);
        if (!std.mem.eql(u8, r.attempts, "1")) {
            try testing.expectEqualStrings("2", r.attempts);
            retried += 1;
        }
    }
    try testing.expect(retried >= 1);

    // Server-sent events arrive byte for byte as the backend sent them.
    for (0..3) |_| {
        const r = try post(&client, base, chat_stream_body);
        defer r.deinit();
        try testing.expectEqual(200, r.status);
        try testing.expectEqualStrings("text/event-stream", r.content_type);
        const want = try std.fmt.allocPrint(gpa,
            \\data: {{"object": "chat.completion.chunk", "model": "m", "backend": "{s}", "choices": [{{"index": 0, "delta": {{"content": "hi"}}}}]}}
            \\
            \\data: {{"object": "chat.completion.chunk", "model": "m", "backend": "{s}", "choices": [], "usage": {{"prompt_tokens": 21, "completion_tokens": 7, "total_tokens": 28}}}}
            \\
            \\data: [DONE]
            \\
            \\
        , .{ r.endpoint, r.endpoint });
        defer gpa.free(want);
        try testing.expectEqualStrings(want, r.body);
    }

    // Bad input gets an OpenAI-style error, not a crash.
    {
        const r = try post(&client, base, "{\"messages\":[]}");
        defer r.deinit();
        try testing.expectEqual(400, r.status);
        try testing.expect(std.mem.indexOf(u8, r.body, "model is required") != null);
    }
    {
        const r = try post(&client, base, "{\"model\":\"nobody-serves-this\",\"messages\":[]}");
        defer r.deinit();
        try testing.expectEqual(404, r.status);
        try testing.expect(std.mem.indexOf(u8, r.body, "model_not_found") != null);
    }

    // Every attempt's outcome reached Decider: nothing left in flight, latencies
    // recorded for the live backends, and the dead one's failures counted.
    const check = try cl.testFile("check_outcomes.py");
    defer gpa.free(check);
    var ok = false;
    for (0..100) |_| {
        const res = try std.process.run(gpa, io, .{ .argv = &.{ cl.py, check, cl.addr } });
        defer gpa.free(res.stdout);
        defer gpa.free(res.stderr);
        if (res.term == .exited and res.term.exited == 0) {
            ok = true;
            break;
        }
        if (res.term != .exited or res.term.exited != 3) {
            std.debug.print("check_outcomes.py: {s}{s}\n", .{ res.stdout, res.stderr });
            return error.TestUnexpectedResult;
        }
        io.sleep(.fromMilliseconds(100), .awake) catch {};
    }
    try testing.expect(ok);
}
