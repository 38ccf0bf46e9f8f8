//! `Client`: Decide (unary or over one shared DecideStream), ReportOutcome on a
//! worker thread, a WatchHealth loop keeping the local health view, and
//! fail-open from that view when Decider cannot be reached (clients/go/decider).
const std = @import("std");
const c = @import("c");
const grpc = @import("grpc.zig");
const status = @import("status.zig");
const model = @import("model.zig");
const proto = @import("proto.zig");
const View = @import("view.zig").View;
const StreamDecider = @import("stream.zig").StreamDecider;

const Allocator = std.mem.Allocator;
const Io = std.Io;
pub const Error = status.Error;
pub const Failure = status.Failure;

pub const Options = struct {
    /// Deadline of each Decide call.
    decide_timeout_ms: u64 = 500,
    /// Deadline of each ReportOutcome call.
    report_timeout_ms: u64 = 2000,
    credentials: grpc.Credentials = .plaintext,
    /// Answer from the last known healthy endpoints when Decider cannot be reached.
    fail_open: bool = false,
    /// Known before any decision, so fail-open works even if Decider was never reachable.
    seed_endpoints: []const model.Endpoint = &.{},
    /// Keep the local health view current from a WatchHealth stream.
    watch: bool = false,
    /// Only this model's health; empty means all.
    watch_model: []const u8 = "",
    /// Deadline of one WatchHealth stream; then it reconnects for a fresh snapshot.
    watch_max_age_ms: u64 = 5 * 60 * 1000,
    /// Send every Decide over one shared DecideStream instead of a unary call each.
    stream: bool = false,
    /// Reports waiting to be sent beyond this are dropped and counted.
    max_pending_reports: usize = 1024,
    /// Threads sending reports; each sends one at a time.
    report_workers: u8 = 2,
};

pub const Stats = struct {
    fail_open_decisions: u64,
    dropped_reports: u64,
    failed_reports: u64,
    sent_reports: u64,
};

const decide_method = "/decider.v1.DeciderService/Decide";
const report_method = "/decider.v1.DeciderService/ReportOutcome";
const watch_method = "/decider.v1.DeciderService/WatchHealth";
pub const decide_stream_method = "/decider.v1.DeciderService/DecideStream";

const min_reconnect_ms = 100;
const max_reconnect_ms = 5000;

fn timeoutMs(ms: u64) Io.Timeout {
    return .{ .duration = .{ .raw = .{ .nanoseconds = @as(i96, ms) * std.time.ns_per_ms }, .clock = .awake } };
}

/// A report waiting for a worker: the outcome's strings live in `buf`.
const Pending = struct {
    buf: []u8,
    outcome: model.Outcome,
};

pub const Client = struct {
    gpa: Allocator,
    io: Io,
    opts: Options,
    channel: grpc.Channel,
    queues: grpc.QueuePool,
    view: View,
    stream: ?*StreamDecider = null,

    mu: Io.Mutex = .init,
    /// Signalled on new reports, finished reports and shutdown.
    cond: Io.Condition = .init,
    queue: std.ArrayList(Pending) = .empty,
    /// Reports taken by workers and not yet finished.
    sending: usize = 0,
    stopping: bool = false,
    workers: [8]?std.Thread = @splat(null),
    watcher: ?std.Thread = null,
    /// The WatchHealth stream open now, so deinit can cancel it.
    watch_stream: ?*grpc.Stream = null,

    fail_open_count: std.atomic.Value(u64) = .init(0),
    dropped_reports: std.atomic.Value(u64) = .init(0),
    failed_reports: std.atomic.Value(u64) = .init(0),
    sent_reports: std.atomic.Value(u64) = .init(0),

    /// Connects to Decider at `target` (host:port). The client is heap-allocated
    /// because its threads hold a pointer to it; `deinit` stops them and frees it.
    pub fn init(gpa: Allocator, io: Io, target: []const u8, opts: Options) !*Client {
        const target_z = try gpa.dupeSentinel(u8, target, 0);
        defer gpa.free(target_z);
        const self = try gpa.create(Client);
        errdefer gpa.destroy(self);
        self.* = .{
            .gpa = gpa,
            .io = io,
            .opts = opts,
            .channel = try grpc.Channel.open(target_z, opts.credentials),
            .queues = undefined,
            .view = View.init(gpa, io),
        };
        self.queues.init();
        errdefer self.queues.deinit();
        errdefer self.channel.close();
        errdefer self.view.deinit();
        self.opts.watch_model = try gpa.dupe(u8, opts.watch_model);
        errdefer gpa.free(self.opts.watch_model);
        self.opts.seed_endpoints = &.{};
        try self.view.learn(opts.seed_endpoints);
        if (opts.stream) self.stream = try StreamDecider.create(self);
        errdefer if (self.stream) |s| s.destroy();
        // From here on nothing fails without `deinit` cleaning up what started.
        errdefer self.stopThreads();
        const n = @min(@max(opts.report_workers, 1), self.workers.len);
        for (self.workers[0..n]) |*w| w.* = try std.Thread.spawn(.{}, reportLoop, .{self});
        if (opts.watch) self.watcher = try std.Thread.spawn(.{}, watchLoop, .{self});
        return self;
    }

    /// Stops the watcher and the stream, sends the reports already queued (each
    /// within its deadline), then closes the channel and frees everything.
    pub fn deinit(self: *Client) void {
        if (self.stream) |s| s.destroy();
        self.stopThreads();
        for (self.queue.items) |p| self.gpa.free(p.buf);
        self.queue.deinit(self.gpa);
        self.view.deinit();
        self.queues.deinit();
        self.channel.close();
        self.gpa.free(self.opts.watch_model);
        self.gpa.destroy(self);
    }

    fn stopThreads(self: *Client) void {
        self.mu.lockUncancelable(self.io);
        self.stopping = true;
        if (self.watch_stream) |s| s.cancel();
        self.cond.broadcast(self.io);
        self.mu.unlock(self.io);
        if (self.watcher) |t| t.join();
        self.watcher = null;
        for (&self.workers) |*w| if (w.*) |t| {
            t.join();
            w.* = null;
        };
    }

    pub fn stats(self: *Client) Stats {
        return .{
            .fail_open_decisions = self.fail_open_count.load(.monotonic),
            .dropped_reports = self.dropped_reports.load(.monotonic),
            .failed_reports = self.failed_reports.load(.monotonic),
            .sent_reports = self.sent_reports.load(.monotonic),
        };
    }

    /// Asks Decider where to send a request, within `decide_timeout_ms`. Decider's
    /// refusals come back as errors (NotFound, NoHealthyEndpoint, QuotaExceeded,
    /// InvalidArgument); when Decider cannot be reached and fail-open is on, the
    /// answer comes from the last known healthy endpoints (`Decision.fail_open`).
    /// `failure`, when given, receives the status of a failed call. The caller
    /// owns the Decision and calls `deinit` on it.
    pub fn decide(self: *Client, req: model.DecideRequest, failure: ?*Failure) Error!model.Decision {
        var local: Failure = .{};
        const f = failure orelse &local;
        f.* = .{};
        const got = if (self.stream) |s| s.decide(req, f) else self.decideUnary(req, f);
        if (got) |d| {
            try self.view.learn(&.{d.endpoint});
            try self.view.learn(d.fallbacks);
            return d;
        } else |err| {
            if (err != error.Rpc) return @errorCast(err);
        }
        const mapped = status.errorFor(f);
        if (mapped != error.DeciderUnreachable or !self.opts.fail_open) return mapped;
        return self.failOpen(req, f);
    }

    fn decideUnary(self: *Client, req: model.DecideRequest, f: *Failure) (Allocator.Error || error{Rpc})!model.Decision {
        var arena = std.heap.ArenaAllocator.init(self.gpa);
        defer arena.deinit();
        const payload = try proto.encodeDecide(arena.allocator(), req);
        var msg = try grpc.unary(self.channel, &self.queues, decide_method, payload, self.opts.decide_timeout_ms, f);
        defer msg.deinit();
        return try proto.decodeDecision(self.gpa, msg.bytes()) orelse {
            f.set(.internal, "DecideResponse did not parse");
            return error.Rpc;
        };
    }

    fn failOpen(self: *Client, req: model.DecideRequest, f: *const Failure) Error!model.Decision {
        var arena = std.heap.ArenaAllocator.init(self.gpa);
        errdefer arena.deinit();
        const a = arena.allocator();
        const eps = try self.view.usable(a, req);
        if (eps.len == 0) return error.DeciderUnreachable;
        _ = self.fail_open_count.fetchAdd(1, .monotonic);
        const reason = try std.fmt.allocPrint(a, "fail-open: decider unreachable ({t}: {s}); {d} last known healthy endpoints", .{ f.code, f.message(), eps.len });
        // The arena is copied last: everything above is allocated in it already.
        return .{
            .arena = arena,
            .id = "",
            .endpoint = eps[0],
            .fallbacks = eps[1..],
            .reason = reason,
            .strategy = "fail_open",
            .scores = &.{},
            .retry = .{},
            .fail_open = true,
        };
    }

    /// Queues an outcome for the report workers and returns at once; when
    /// `max_pending_reports` are waiting the report is dropped and counted.
    pub fn reportOutcome(self: *Client, o: model.Outcome) void {
        const size = o.decision_id.len + o.endpoint_id.len;
        const buf = self.gpa.alloc(u8, size) catch {
            _ = self.dropped_reports.fetchAdd(1, .monotonic);
            return;
        };
        @memcpy(buf[0..o.decision_id.len], o.decision_id);
        @memcpy(buf[o.decision_id.len..], o.endpoint_id);
        var owned = o;
        owned.decision_id = buf[0..o.decision_id.len];
        owned.endpoint_id = buf[o.decision_id.len..];

        self.mu.lockUncancelable(self.io);
        defer self.mu.unlock(self.io);
        if (self.stopping or self.queue.items.len >= self.opts.max_pending_reports) {
            self.gpa.free(buf);
            _ = self.dropped_reports.fetchAdd(1, .monotonic);
            return;
        }
        self.queue.append(self.gpa, .{ .buf = buf, .outcome = owned }) catch {
            self.gpa.free(buf);
            _ = self.dropped_reports.fetchAdd(1, .monotonic);
            return;
        };
        self.cond.broadcast(self.io);
    }

    /// Sends one outcome and waits for the answer: whether Decider still knew the decision.
    pub fn reportOutcomeWait(self: *Client, o: model.Outcome, failure: ?*Failure) Error!bool {
        var local: Failure = .{};
        const f = failure orelse &local;
        var arena = std.heap.ArenaAllocator.init(self.gpa);
        defer arena.deinit();
        const payload = try proto.encodeOutcome(arena.allocator(), o);
        var msg = grpc.unary(self.channel, &self.queues, report_method, payload, self.opts.report_timeout_ms, f) catch |err| switch (err) {
            error.OutOfMemory => return error.OutOfMemory,
            error.Rpc => return status.errorFor(f),
        };
        defer msg.deinit();
        const bytes = msg.bytes();
        const r = c.decider__v1__report_outcome_response__unpack(null, bytes.len, bytes.ptr) orelse return error.Rejected;
        defer c.decider__v1__report_outcome_response__free_unpacked(r, null);
        return r.*.decision_found != 0;
    }

    /// Waits until every report queued before the call has been sent, at most `timeout_ms`.
    pub fn flush(self: *Client, timeout_ms: u64) bool {
        const deadline = grpc.nowMs() + timeout_ms;
        self.mu.lockUncancelable(self.io);
        defer self.mu.unlock(self.io);
        while (self.queue.items.len > 0 or self.sending > 0) {
            const now = grpc.nowMs();
            if (now >= deadline) return false;
            self.cond.waitTimeout(self.io, &self.mu, timeoutMs(deadline - now)) catch {};
        }
        return true;
    }

    fn reportLoop(self: *Client) void {
        self.mu.lockUncancelable(self.io);
        defer self.mu.unlock(self.io);
        while (true) {
            while (self.queue.items.len == 0 and !self.stopping) self.cond.waitUncancelable(self.io, &self.mu);
            // Shutdown still sends what was queued; each send has its own deadline.
            if (self.queue.items.len == 0) return;
            const p = self.queue.orderedRemove(0);
            self.sending += 1;
            self.mu.unlock(self.io);
            var f: Failure = .{};
            if (self.reportOutcomeWait(p.outcome, &f)) |_| {
                _ = self.sent_reports.fetchAdd(1, .monotonic);
            } else |_| {
                _ = self.failed_reports.fetchAdd(1, .monotonic);
            }
            self.gpa.free(p.buf);
            self.mu.lockUncancelable(self.io);
            self.sending -= 1;
            self.cond.broadcast(self.io);
        }
    }

    /// The last health Decider published for an endpoint, if any.
    pub fn health(self: *Client, endpoint_id: []const u8) ?model.HealthView {
        return self.view.healthOf(endpoint_id);
    }

    /// WatchHealth snapshots applied so far; 0 means the view has not synced yet.
    pub fn healthSnapshots(self: *Client) u64 {
        return self.view.snapshots.load(.acquire);
    }

    /// Remembers endpoints for fail-open beyond those seen in decisions (a registry listing, a config file).
    pub fn learnEndpoints(self: *Client, eps: []const model.Endpoint) Allocator.Error!void {
        try self.view.learn(eps);
    }

    fn watchLoop(self: *Client) void {
        var backoff_ms: u64 = min_reconnect_ms;
        while (true) {
            const got = self.watchOnce();
            if (got) backoff_ms = min_reconnect_ms;
            self.mu.lockUncancelable(self.io);
            defer self.mu.unlock(self.io);
            if (self.stopping) return;
            self.cond.waitTimeout(self.io, &self.mu, timeoutMs(backoff_ms)) catch {};
            if (self.stopping) return;
            backoff_ms = @min(2 * backoff_ms, max_reconnect_ms);
        }
    }

    /// Runs one WatchHealth stream to its end; whether it received anything.
    fn watchOnce(self: *Client) bool {
        var s: grpc.Stream = undefined;
        s.open(self.channel, watch_method, self.opts.watch_max_age_ms) catch return false;
        defer s.deinit();
        {
            self.mu.lockUncancelable(self.io);
            defer self.mu.unlock(self.io);
            if (self.stopping) return false;
            self.watch_stream = &s;
        }
        defer {
            self.mu.lockUncancelable(self.io);
            self.watch_stream = null;
            self.mu.unlock(self.io);
        }
        var arena = std.heap.ArenaAllocator.init(self.gpa);
        defer arena.deinit();
        const payload = proto.encodeWatch(arena.allocator(), self.opts.watch_model) catch return false;
        var got = false;
        if (s.send(payload, true) catch false) {
            while (s.recv()) |msg_| {
                var msg = msg_;
                defer msg.deinit();
                got = true;
                self.applyHealth(msg.bytes()) catch {};
            }
        }
        var f: Failure = .{};
        _ = s.finish(&f);
        return got;
    }

    fn applyHealth(self: *Client, bytes: []const u8) !void {
        const r = c.decider__v1__watch_health_response__unpack(null, bytes.len, bytes.ptr) orelse return;
        defer c.decider__v1__watch_health_response__free_unpacked(r, null);
        const events = try self.gpa.alloc(View.Event, r.*.n_events);
        defer self.gpa.free(events);
        for (events, 0..) |*ev, i| {
            const e = r.*.events[i];
            ev.* = .{
                .endpoint_id = std.mem.span(e.*.endpoint_id),
                .model = std.mem.span(e.*.model),
                .view = .{ .status = @enumFromInt(@as(u32, @intCast(e.*.status))), .breaker = @enumFromInt(@as(u32, @intCast(e.*.breaker_state))) },
                .removed = e.*.removed != 0,
            };
        }
        try self.view.apply(self.opts.watch_model, r.*.snapshot != 0, events);
    }
};
