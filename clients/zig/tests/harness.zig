//! Starts what the live tests need on 127.0.0.1, as clients/go's decidertest
//! does: the real Decider from the repository's .venv and stand-in
//! OpenAI-compatible backends (tests/backend.py). Every process is stopped by
//! its own pid when the test ends.
const std = @import("std");

const Io = std.Io;
const Allocator = std.mem.Allocator;

/// The checkout's root: the first directory above the working directory holding protos/decider/v1.
pub fn repoRoot(gpa: Allocator, io: Io) ![]u8 {
    const cwd = try std.process.currentPathAlloc(io, gpa);
    defer gpa.free(cwd);
    var dir: []u8 = try gpa.dupe(u8, cwd);
    for (0..10) |_| {
        const probe = try std.fs.path.join(gpa, &.{ dir, "protos", "decider", "v1" });
        defer gpa.free(probe);
        if (Io.Dir.cwd().access(io, probe, .{})) |_| {
            return dir;
        } else |_| {}
        const parent = std.fs.path.dirname(dir) orelse break;
        const up = try gpa.dupe(u8, parent);
        gpa.free(dir);
        dir = up;
    }
    gpa.free(dir);
    return error.RepoRootNotFound;
}

/// The venv's python, or error.SkipZigTest (saying why) when the venv is missing.
pub fn python(gpa: Allocator, io: Io, root: []const u8) ![]u8 {
    const py = try std.fs.path.join(gpa, &.{ root, ".venv", "bin", "python" });
    Io.Dir.cwd().access(io, py, .{}) catch {
        std.debug.print("SKIP: the project venv is missing ({s}); run `make install` to test against the real Decider\n", .{py});
        gpa.free(py);
        return error.SkipZigTest;
    };
    return py;
}

/// A child process whose stdout or stderr announces its port, drained by a thread afterwards.
pub const Proc = struct {
    child: std.process.Child,
    io: Io,
    port: u16 = 0,
    drain: ?std.Thread = null,
    stopped: bool = false,

    /// Spawns argv and reads `which` until a line containing `marker` followed by a port.
    pub fn start(p: *Proc, io: Io, argv: []const []const u8, which: enum { stdout, stderr }, marker: []const u8) !void {
        p.* = .{ .io = io, .child = try std.process.spawn(io, .{
            .argv = argv,
            .stdin = .ignore,
            .stdout = if (which == .stdout) .pipe else .ignore,
            .stderr = if (which == .stderr) .pipe else .ignore,
        }) };
        errdefer p.child.kill(io);
        const file = if (which == .stdout) p.child.stdout.? else p.child.stderr.?;
        var buf: [4096]u8 = undefined;
        var r = file.readerStreaming(io, &buf);
        var log: std.ArrayList(u8) = .empty;
        defer log.deinit(std.heap.page_allocator);
        while (true) {
            const line = r.interface.takeDelimiter('\n') catch |err| {
                std.debug.print("{s} output unreadable: {t}\n", .{ argv[0], err });
                return error.ProcessFailed;
            } orelse {
                std.debug.print("{s} exited before serving:\n{s}\n", .{ argv[0], log.items });
                return error.ProcessFailed;
            };
            log.appendSlice(std.heap.page_allocator, line) catch {};
            log.append(std.heap.page_allocator, '\n') catch {};
            if (std.mem.indexOf(u8, line, marker)) |i| {
                p.port = parsePort(line[i + marker.len ..]) orelse continue;
                break;
            }
        }
        // Keep reading so the child never blocks on a full pipe.
        p.drain = try std.Thread.spawn(.{}, drainPipe, .{ io, file });
    }

    fn drainPipe(io: Io, file: Io.File) void {
        var buf: [4096]u8 = undefined;
        var r = file.readerStreaming(io, &buf);
        _ = r.interface.discardRemaining() catch {};
    }

    /// Ends the process at once, as a crash would, and reaps it.
    pub fn kill(p: *Proc) void {
        if (p.stopped) return;
        p.stopped = true;
        p.child.kill(p.io);
        if (p.drain) |t| t.join();
    }
};

fn parsePort(rest: []const u8) ?u16 {
    var i: usize = 0;
    while (i < rest.len and !std.ascii.isDigit(rest[i])) : (i += 1) {}
    var j = i;
    while (j < rest.len and std.ascii.isDigit(rest[j])) : (j += 1) {}
    return std.fmt.parseInt(u16, rest[i..j], 10) catch null;
}

pub const Backend = struct {
    id: []const u8,
    proc: Proc,
    addr_buf: [32]u8 = undefined,
    addr: []const u8 = "",

    pub fn start(b: *Backend, io: Io, py: []const u8, guard: []const u8, script: []const u8, id: []const u8) !void {
        b.id = id;
        try b.proc.start(io, &.{ py, guard, py, script, id }, .stdout, "listening on 127.0.0.1:");
        b.addr = try std.fmt.bufPrint(&b.addr_buf, "127.0.0.1:{d}", .{b.proc.port});
    }

    pub fn kill(b: *Backend) void {
        b.proc.kill();
    }
};

/// A Decider serving model "m" on the given backends, plus `extra` TOML.
pub const Cluster = struct {
    gpa: Allocator,
    io: Io,
    root: []u8,
    py: []u8,
    backends: []Backend,
    decider: Proc,
    addr_buf: [32]u8 = undefined,
    addr: []const u8 = "",
    tmp: std.testing.TmpDir,

    pub fn start(gpa: Allocator, io: Io, ids: []const []const u8, extra: []const u8) !*Cluster {
        const root = try repoRoot(gpa, io);
        errdefer gpa.free(root);
        const py = try python(gpa, io, root);
        errdefer gpa.free(py);
        const c = try gpa.create(Cluster);
        errdefer gpa.destroy(c);
        c.* = .{ .gpa = gpa, .io = io, .root = root, .py = py, .backends = try gpa.alloc(Backend, ids.len), .decider = undefined, .tmp = std.testing.tmpDir(.{}) };
        errdefer gpa.free(c.backends);
        errdefer c.tmp.cleanup();

        const script = try std.fs.path.join(gpa, &.{ root, "clients", "zig", "tests", "backend.py" });
        defer gpa.free(script);
        const guard = try std.fs.path.join(gpa, &.{ root, "clients", "zig", "tests", "guarded.py" });
        defer gpa.free(guard);
        var started: usize = 0;
        errdefer for (c.backends[0..started]) |*b| b.kill();
        for (ids, c.backends) |id, *b| {
            try b.start(io, py, guard, script, id);
            started += 1;
        }

        // Breakers open after 3 reported failures and probes run every 0.2 s so
        // health tests converge fast; fallbacks cover every other endpoint. Only a
        // refused connection may count against a backend: on a loaded machine a
        // stand-in answers its probe late, and a probe slower than degraded_latency_s
        // would make it DEGRADED and take it out of round robin's first tier.
        var cfg: std.ArrayList(u8) = .empty;
        defer cfg.deinit(gpa);
        try cfg.appendSlice(gpa,
            \\[routing]
            \\default_strategy = "round_robin"
            \\max_fallbacks = 3
            \\retry_max_attempts = 4
            \\retry_initial_backoff_s = 0.005
            \\retry_max_backoff_s = 0.02
            \\
            \\[breaker]
            \\consecutive_failures = 3
            \\open_s = 120
            \\
            \\[probe]
            \\interval_s = 0.2
            \\unhealthy_interval_s = 0.2
            \\unhealthy_threshold = 1
            \\timeout_s = 10
            \\degraded_latency_s = 10
            \\liveness = "off"
            \\
        );
        try cfg.appendSlice(gpa, extra);
        for (c.backends) |b| {
            try cfg.print(gpa, "\n[[endpoints]]\nid = \"{s}\"\naddress = \"{s}\"\nmodel = \"m\"\nhealth_url = \"http://{s}/health\"\n", .{ b.id, b.addr, b.addr });
        }
        try c.tmp.dir.writeFile(io, .{ .sub_path = "decider.toml", .data = cfg.items });
        const dir = try tmpPath(gpa, io, &c.tmp);
        defer gpa.free(dir);
        const cfg_path = try std.fs.path.join(gpa, &.{ dir, "decider.toml" });
        defer gpa.free(cfg_path);
        const data_dir = try std.fs.path.join(gpa, &.{ dir, "data" });
        defer gpa.free(data_dir);
        try c.decider.start(io, &.{ py, guard, py, "-m", "decider", "serve", "--listen", "127.0.0.1:0", "--config", cfg_path, "--data-dir", data_dir, "--grace-period-s", "1" }, .stderr, "(port ");
        c.addr = try std.fmt.bufPrint(&c.addr_buf, "127.0.0.1:{d}", .{c.decider.port});
        return c;
    }

    /// Path of a file under clients/zig/tests (allocated from gpa).
    pub fn testFile(c: *Cluster, name: []const u8) ![]u8 {
        return std.fs.path.join(c.gpa, &.{ c.root, "clients", "zig", "tests", name });
    }

    pub fn backend(c: *Cluster, id: []const u8) *Backend {
        for (c.backends) |*b| if (std.mem.eql(u8, b.id, id)) return b;
        unreachable;
    }

    pub fn stop(c: *Cluster) void {
        c.decider.kill();
        for (c.backends) |*b| b.kill();
        c.tmp.cleanup();
        c.gpa.free(c.backends);
        c.gpa.free(c.py);
        c.gpa.free(c.root);
        c.gpa.destroy(c);
    }
};

/// The absolute path of a std.testing.tmpDir (under .zig-cache/tmp of the working directory).
pub fn tmpPath(gpa: Allocator, io: Io, tmp: *const std.testing.TmpDir) ![]u8 {
    const cwd = try std.process.currentPathAlloc(io, gpa);
    defer gpa.free(cwd);
    return std.fs.path.join(gpa, &.{ cwd, ".zig-cache", "tmp", &tmp.sub_path });
}

/// A loopback address nothing listens on: a port bound, noted and closed again.
pub fn deadAddress(io: Io, buf: []u8) ![]const u8 {
    var a: Io.net.IpAddress = try .parseIp4("127.0.0.1", 0);
    var srv = try a.listen(io, .{});
    defer srv.deinit(io);
    return std.fmt.bufPrint(buf, "127.0.0.1:{d}", .{srv.socket.address.getPort()});
}

/// Polls `cond` every 10 ms for at most 20 s; the bound keeps a broken test from hanging.
pub fn waitFor(io: Io, what: []const u8, ctx: anytype, comptime cond: fn (@TypeOf(ctx)) bool) !void {
    for (0..2000) |_| {
        if (cond(ctx)) return;
        io.sleep(.fromMilliseconds(10), .awake) catch {};
    }
    std.debug.print("gave up waiting for {s}\n", .{what});
    return error.Timeout;
}
