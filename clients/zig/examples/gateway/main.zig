//! decider-gateway: the example Zig gateway. An OpenAI-compatible reverse proxy
//! that asks Decider where to send each /v1/chat/completions request.
//!
//!     decider-gateway --listen 127.0.0.1:8080 --decider 127.0.0.1:50051 [--stream] [--no-fail-open]
//!
//! The session comes from the X-Session-Id header (or the body's "user"), the
//! tenant from X-Tenant. Responses carry X-Decider-Endpoint and X-Decider-Attempts.
const std = @import("std");
const decider = @import("decider");
const Gateway = @import("gateway.zig").Gateway;

const usage =
    \\usage: decider-gateway [--listen HOST:PORT] [--decider HOST:PORT] [--decide-timeout-ms N]
    \\                       [--stream] [--no-fail-open] [--tls-roots FILE]
    \\
;

pub fn main(init: std.process.Init) !void {
    const gpa = init.gpa;
    const io = init.io;
    var listen: []const u8 = "127.0.0.1:8080";
    var target: []const u8 = "127.0.0.1:50051";
    var opts: decider.Options = .{ .fail_open = true, .watch = true };
    var roots: ?[:0]u8 = null;
    defer if (roots) |r| gpa.free(r);

    var args = try init.minimal.args.iterateAllocator(gpa);
    defer args.deinit();
    _ = args.skip();
    while (args.next()) |arg| {
        if (std.mem.eql(u8, arg, "--listen")) {
            listen = args.next() orelse return fail(usage);
        } else if (std.mem.eql(u8, arg, "--decider")) {
            target = args.next() orelse return fail(usage);
        } else if (std.mem.eql(u8, arg, "--decide-timeout-ms")) {
            opts.decide_timeout_ms = std.fmt.parseInt(u64, args.next() orelse return fail(usage), 10) catch return fail(usage);
        } else if (std.mem.eql(u8, arg, "--stream")) {
            opts.stream = true;
        } else if (std.mem.eql(u8, arg, "--no-fail-open")) {
            opts.fail_open = false;
        } else if (std.mem.eql(u8, arg, "--tls-roots")) {
            const path = args.next() orelse return fail(usage);
            const pem = try std.Io.Dir.cwd().readFileAlloc(io, path, gpa, .limited(1 << 20));
            defer gpa.free(pem);
            roots = try gpa.dupeSentinel(u8, pem, 0);
            opts.credentials = .{ .tls = .{ .root_certs_pem = roots.? } };
        } else return fail(usage);
    }

    const client = try decider.Client.init(gpa, io, target, opts);
    defer client.deinit();
    var http_client: std.http.Client = .{ .allocator = gpa, .io = io };
    defer http_client.deinit();
    var gw: Gateway = .{ .gpa = gpa, .io = io, .client = client, .http_client = &http_client };

    const colon = std.mem.lastIndexOfScalar(u8, listen, ':') orelse return fail(usage);
    const port = std.fmt.parseInt(u16, listen[colon + 1 ..], 10) catch return fail(usage);
    var addr = try std.Io.net.IpAddress.parse(listen[0..colon], port);
    var server = try addr.listen(io, .{ .reuse_address = true });
    defer server.deinit(io);
    // Tests and scripts read the bound address from this line.
    var out_buf: [128]u8 = undefined;
    var out = std.Io.File.stdout().writer(io, &out_buf);
    try out.interface.print("decider-gateway listening on http://{s}:{d}\n", .{ listen[0..colon], server.socket.address.getPort() });
    try out.interface.flush();

    while (true) {
        const conn = server.accept(io) catch |err| switch (err) {
            error.ConnectionAborted => continue,
            else => return err,
        };
        const t = std.Thread.spawn(.{}, Gateway.serveConnection, .{ &gw, conn }) catch {
            conn.close(io);
            continue;
        };
        t.detach();
    }
}

fn fail(msg: []const u8) error{InvalidArguments} {
    std.debug.print("{s}", .{msg});
    return error.InvalidArguments;
}
