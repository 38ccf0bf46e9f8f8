//! The client against the real Decider (from the repository's .venv) and real
//! HTTP backends on 127.0.0.1. Skipped, saying so, only when the venv is missing.
const std = @import("std");
const decider = @import("decider");
const harness = @import("harness.zig");

test {
    _ = @import("prefix_test.zig");
    _ = @import("gateway_test.zig");
}

const testing = std.testing;
const gpa = testing.allocator;
const io = testing.io;

fn isOneOf(id: []const u8, ids: []const []const u8) bool {
    for (ids) |x| if (std.mem.eql(u8, x, id)) return true;
    return false;
}

fn allThreeHealthy(client: *decider.Client) bool {
    for ([_][]const u8{ "a", "b", "c" }) |id| {
        const h = client.health(id) orelse return false;
        if (h.status != .healthy) return false;
    }
    return true;
}

test "decide and report: round robin over three endpoints, every outcome counted" {
    const cl = try harness.Cluster.start(gpa, io, &.{ "a", "b", "c" }, "");
    defer cl.stop();
    {
        // Round robin covers the best health tier only: until every first probe has
        // answered, the endpoints already HEALTHY would take every decision.
        const watcher = try decider.Client.init(gpa, io, cl.addr, .{ .watch = true });
        defer watcher.deinit();
        try harness.waitFor(io, "a, b and c to be HEALTHY", watcher, allThreeHealthy);
    }
    for ([_]bool{ false, true }) |stream| {
        const client = try decider.Client.init(gpa, io, cl.addr, .{ .decide_timeout_ms = 5000, .stream = stream });
        defer client.deinit();
        var seen: [3]u32 = @splat(0);
        for (0..30) |_| {
            var d = try client.decide(.{ .model = "m", .strategy = "round_robin" }, null);
            defer d.deinit();
            try testing.expect(d.id.len > 0 and !d.fail_open);
            try testing.expect(isOneOf(d.endpoint.id, &.{ "a", "b", "c" }));
            try testing.expectEqual(2, d.fallbacks.len);
            try testing.expectEqual(4, d.retry.max_attempts);
            try testing.expectEqualStrings("round_robin", d.strategy);
            seen[d.endpoint.id[0] - 'a'] += 1;
            client.reportOutcome(.{ .decision_id = d.id, .endpoint_id = d.endpoint.id, .result = .success, .latency_ns = 3 * std.time.ns_per_ms, .input_tokens = 21, .output_tokens = 7, .ttft_ns = std.time.ns_per_ms });
        }
        // Round robin over three: every endpoint chosen (the order may start anywhere).
        for (seen) |n| if (n == 0) {
            std.debug.print("round_robin choices a/b/c: {any} (stream: {})\n", .{ seen, stream });
            return error.TestUnexpectedResult;
        };
        try testing.expect(client.flush(10_000));
        const st = client.stats();
        try testing.expectEqual(30, st.sent_reports);
        try testing.expectEqual(0, st.failed_reports + st.dropped_reports);
        // A report waited for says whether Decider still knew the decision.
        var d = try client.decide(.{ .model = "m" }, null);
        defer d.deinit();
        try testing.expect(try client.reportOutcomeWait(.{ .decision_id = d.id, .endpoint_id = d.endpoint.id, .result = .success }, null));
        try testing.expect(!try client.reportOutcomeWait(.{ .decision_id = "never-issued", .endpoint_id = "a", .result = .success }, null));
    }
}

test "status mapping: NOT_FOUND, UNAVAILABLE, RESOURCE_EXHAUSTED, INVALID_ARGUMENT" {
    const cl = try harness.Cluster.start(gpa, io, &.{"a"},
        \\[quotas.tenants.tiny]
        \\requests_per_minute = 1
        \\
    );
    defer cl.stop();
    for ([_]bool{ false, true }) |stream| {
        // Fail-open is on: none of these refusals may trigger it.
        const client = try decider.Client.init(gpa, io, cl.addr, .{ .decide_timeout_ms = 5000, .stream = stream, .fail_open = true });
        defer client.deinit();
        var f: decider.Failure = .{};

        try testing.expectError(error.NotFound, client.decide(.{ .model = "nobody-serves-this" }, &f));
        try testing.expectEqual(decider.StatusCode.not_found, f.code);

        try testing.expectError(error.NoHealthyEndpoint, client.decide(.{ .model = "m", .exclude_endpoint_ids = &.{"a"} }, &f));
        try testing.expectEqual(decider.StatusCode.unavailable, f.code);
        try testing.expectEqualStrings("NO_HEALTHY_ENDPOINT", f.reason());

        try testing.expectError(error.InvalidArgument, client.decide(.{ .model = "m", .strategy = "no_such_strategy" }, &f));
        try testing.expectEqual(decider.StatusCode.invalid_argument, f.code);
        try testing.expect(f.message().len > 0);

        // The tenant's one request a minute went to the first client; every later one is over quota.
        const tenant = if (stream) "tiny" else "tiny";
        if (!stream) {
            var first = try client.decide(.{ .model = "m", .tenant = tenant }, &f);
            first.deinit();
        }
        try testing.expectError(error.QuotaExceeded, client.decide(.{ .model = "m", .tenant = tenant }, &f));
        try testing.expectEqual(decider.StatusCode.resource_exhausted, f.code);
        try testing.expect(f.retry_after_ms > 0);

        try testing.expectEqual(0, client.stats().fail_open_decisions);
    }
}

fn breakerOrHealthOut(client: *decider.Client) bool {
    const h = client.health("a") orelse return false;
    return !h.usable();
}

fn synced(client: *decider.Client) bool {
    return client.healthSnapshots() > 0;
}

test "WatchHealth sees a killed backend" {
    const cl = try harness.Cluster.start(gpa, io, &.{ "a", "b" }, "");
    defer cl.stop();
    const client = try decider.Client.init(gpa, io, cl.addr, .{ .watch = true });
    defer client.deinit();
    try harness.waitFor(io, "the first health snapshot", client, synced);
    cl.backend("a").kill();
    try harness.waitFor(io, "a to leave the usable set in the health view", client, breakerOrHealthOut);
    const h = client.health("b").?;
    try testing.expect(h.usable());
}

test "fail-open answers from the last known healthy endpoints when Decider is stopped" {
    const cl = try harness.Cluster.start(gpa, io, &.{ "a", "b" }, "");
    defer cl.stop();
    const open = try decider.Client.init(gpa, io, cl.addr, .{ .fail_open = true, .watch = true, .decide_timeout_ms = 1000 });
    defer open.deinit();
    const closed = try decider.Client.init(gpa, io, cl.addr, .{ .decide_timeout_ms = 1000 });
    defer closed.deinit();
    const streamed = try decider.Client.init(gpa, io, cl.addr, .{ .fail_open = true, .stream = true, .decide_timeout_ms = 1000 });
    defer streamed.deinit();
    try harness.waitFor(io, "the first health snapshot", open, synced);
    for (0..4) |_| {
        for ([_]*decider.Client{ open, closed, streamed }) |client| {
            var d = try client.decide(.{ .model = "m", .strategy = "round_robin" }, null);
            d.deinit();
        }
    }
    cl.decider.kill();

    var seen_a = false;
    var seen_b = false;
    for (0..10) |_| {
        for ([_]*decider.Client{ open, streamed }) |client| {
            var f: decider.Failure = .{};
            var d = try client.decide(.{ .model = "m" }, &f);
            defer d.deinit();
            try testing.expect(d.fail_open and d.id.len == 0);
            try testing.expectEqualStrings("fail_open", d.strategy);
            try testing.expectEqual(1, d.fallbacks.len);
            seen_a = seen_a or std.mem.eql(u8, d.endpoint.id, "a");
            seen_b = seen_b or std.mem.eql(u8, d.endpoint.id, "b");
        }
    }
    // Fail-open spreads the load over what it knows.
    try testing.expect(seen_a and seen_b);
    try testing.expectEqual(10, open.stats().fail_open_decisions);
    // Nothing known for another model: unreachable even with fail-open.
    try testing.expectError(error.DeciderUnreachable, open.decide(.{ .model = "other" }, null));
    var f: decider.Failure = .{};
    try testing.expectError(error.DeciderUnreachable, closed.decide(.{ .model = "m" }, &f));
    try testing.expect(f.code == .unavailable or f.code == .deadline_exceeded);
}

test "seed endpoints make fail-open work when Decider was never reachable" {
    var addr_buf: [32]u8 = undefined;
    const addr = try harness.deadAddress(io, &addr_buf);
    const client = try decider.Client.init(gpa, io, addr, .{ .fail_open = true, .seed_endpoints = &.{.{ .id = "s", .address = "127.0.0.1:9", .model = "m" }} });
    defer client.deinit();
    var d = try client.decide(.{ .model = "m" }, null);
    defer d.deinit();
    try testing.expect(d.fail_open);
    try testing.expectEqualStrings("s", d.endpoint.id);
}

fn readPem(dir: []const u8, name: []const u8) ![:0]u8 {
    const path = try std.fs.path.join(gpa, &.{ dir, name });
    defer gpa.free(path);
    const pem = try std.Io.Dir.cwd().readFileAlloc(io, path, gpa, .limited(1 << 20));
    defer gpa.free(pem);
    return gpa.dupeSentinel(u8, pem, 0);
}

test "TLS and mutual TLS against a TLS-serving Decider" {
    // Certificates made now by the repository's test CA (tests/tls_certs.py).
    var certs = testing.tmpDir(.{});
    defer certs.cleanup();
    const dir = try harness.tmpPath(gpa, io, &certs);
    defer gpa.free(dir);
    const root = try harness.repoRoot(gpa, io);
    defer gpa.free(root);
    const py = try harness.python(gpa, io, root);
    defer gpa.free(py);
    const script = try std.fs.path.join(gpa, &.{ root, "clients", "zig", "tests", "make_certs.py" });
    defer gpa.free(script);
    const made = try std.process.run(gpa, io, .{ .argv = &.{ py, script, dir } });
    defer gpa.free(made.stdout);
    defer gpa.free(made.stderr);
    if (made.term != .exited or made.term.exited != 0) {
        std.debug.print("make_certs.py: {s}\n", .{made.stderr});
        return error.TestUnexpectedResult;
    }
    const ca = try readPem(dir, "ca.crt");
    defer gpa.free(ca);
    const cert = try readPem(dir, "client.crt");
    defer gpa.free(cert);
    const key = try readPem(dir, "client.key");
    defer gpa.free(key);

    for ([_]bool{ false, true }) |mutual| {
        const extra = try std.fmt.allocPrint(gpa, "\n[server.tls]\ncert_file = \"{s}/server.crt\"\nkey_file = \"{s}/server.key\"\n{s}{s}{s}", .{
            dir, dir, if (mutual) "client_ca_file = \"" else "", if (mutual) dir else "", if (mutual) "/ca.crt\"\n" else "",
        });
        defer gpa.free(extra);
        const cl = try harness.Cluster.start(gpa, io, &.{"a"}, extra);
        defer cl.stop();

        const tls: decider.Tls = .{ .root_certs_pem = ca, .server_name_override = "decider.test", .cert_chain_pem = if (mutual) cert else null, .private_key_pem = if (mutual) key else null };
        for ([_]bool{ false, true }) |stream| {
            const client = try decider.Client.init(gpa, io, cl.addr, .{ .credentials = .{ .tls = tls }, .decide_timeout_ms = 5000, .stream = stream });
            defer client.deinit();
            var d = try client.decide(.{ .model = "m" }, null);
            defer d.deinit();
            try testing.expectEqualStrings("a", d.endpoint.id);
            try testing.expect(try client.reportOutcomeWait(.{ .decision_id = d.id, .endpoint_id = "a", .result = .success }, null));
        }

        // Refused handshakes: Decider is unreachable to these clients, never spoken to in plaintext.
        const refused = [_]decider.Credentials{
            .plaintext,
            // The right server, verified against the system roots instead of the test CA.
            .{ .tls = .{ .server_name_override = "decider.test" } },
            // Without a client certificate, where the server asks for one.
            .{ .tls = .{ .root_certs_pem = ca, .server_name_override = "decider.test" } },
        };
        for (refused, 0..) |creds, i| {
            if (i == 2 and !mutual) continue;
            const client = try decider.Client.init(gpa, io, cl.addr, .{ .credentials = creds, .decide_timeout_ms = 2000 });
            defer client.deinit();
            var f: decider.Failure = .{};
            try testing.expectError(error.DeciderUnreachable, client.decide(.{ .model = "m" }, &f));
        }
    }
}
