//! decider-bench: sequential Decide calls from the Zig client, for
//! bench/grpc/bench_clients.py. Prints one JSON line: per-call latency
//! (mean, p50, p99) and the client's CPU per call (user + system of every
//! thread in the process, the C core's included) over the measured calls.
//!
//!     decider-bench --target 127.0.0.1:50051 --model m --mode unary|stream --calls 3000 --warmup 300
const std = @import("std");
const decider = @import("decider");

fn cpuNs() u64 {
    const ru = std.posix.getrusage(std.posix.rusage.SELF);
    const us = (ru.utime.sec + ru.stime.sec) * 1_000_000 + ru.utime.usec + ru.stime.usec;
    return @as(u64, @intCast(us)) * 1000;
}

pub fn main(init: std.process.Init) !void {
    const gpa = init.gpa;
    const io = init.io;
    var target: []const u8 = "127.0.0.1:50051";
    var stream = false;
    var calls: usize = 3000;
    var warmup: usize = 300;
    var model: []const u8 = "m";
    var args = try init.minimal.args.iterateAllocator(gpa);
    defer args.deinit();
    _ = args.skip();
    while (args.next()) |arg| {
        const value = args.next() orelse return error.InvalidArguments;
        if (std.mem.eql(u8, arg, "--target")) {
            target = value;
        } else if (std.mem.eql(u8, arg, "--model")) {
            model = value;
        } else if (std.mem.eql(u8, arg, "--mode")) {
            stream = std.mem.eql(u8, value, "stream");
        } else if (std.mem.eql(u8, arg, "--calls")) {
            calls = try std.fmt.parseInt(usize, value, 10);
        } else if (std.mem.eql(u8, arg, "--warmup")) {
            warmup = try std.fmt.parseInt(usize, value, 10);
        } else return error.InvalidArguments;
    }

    const client = try decider.Client.init(gpa, io, target, .{ .stream = stream, .decide_timeout_ms = 5000 });
    defer client.deinit();
    const req: decider.DecideRequest = .{ .model = model, .session_id = "bench", .prefix_hashes = &.{ 1, 2, 3, 4 } };
    for (0..warmup) |_| {
        var d = try client.decide(req, null);
        d.deinit();
    }
    const lat = try gpa.alloc(u64, calls);
    defer gpa.free(lat);
    const cpu0 = cpuNs();
    const wall0 = decider.nowNs();
    for (lat) |*l| {
        const t0 = decider.nowNs();
        var d = try client.decide(req, null);
        l.* = decider.nowNs() - t0;
        d.deinit();
    }
    const wall = decider.nowNs() - wall0;
    const cpu = cpuNs() - cpu0;
    std.mem.sort(u64, lat, {}, std.sort.asc(u64));
    var sum: u64 = 0;
    for (lat) |l| sum += l;
    var out_buf: [512]u8 = undefined;
    var out = std.Io.File.stdout().writer(io, &out_buf);
    try out.interface.print(
        "{{\"client\":\"zig\",\"mode\":\"{s}\",\"calls\":{d},\"wall_s\":{d:.3},\"mean_us\":{d:.1},\"p50_us\":{d:.1},\"p99_us\":{d:.1},\"cpu_us_per_call\":{d:.1}}}\n",
        .{
            if (stream) "stream" else "unary",
            calls,
            @as(f64, @floatFromInt(wall)) / 1e9,
            @as(f64, @floatFromInt(sum / calls)) / 1e3,
            @as(f64, @floatFromInt(lat[calls / 2])) / 1e3,
            @as(f64, @floatFromInt(lat[calls * 99 / 100])) / 1e3,
            @as(f64, @floatFromInt(cpu / calls)) / 1e3,
        },
    );
    try out.interface.flush();
}
