//! Decide over one shared DecideStream: each call sends a correlation id and
//! waits for the answer carrying it. A broken stream fails every call waiting
//! on it with the stream's status (so fail-open treats it like a failed unary
//! call) and the next call opens a new stream (clients/go/decider/stream.go).
const std = @import("std");
const c = @import("c");
const grpc = @import("grpc.zig");
const status = @import("status.zig");
const model = @import("model.zig");
const proto = @import("proto.zig");
const Client = @import("client.zig").Client;
const decide_stream_method = @import("client.zig").decide_stream_method;

const Allocator = std.mem.Allocator;
const Io = std.Io;
const Failure = status.Failure;

const Waiter = struct {
    done: bool = false,
    decision: ?model.Decision = null,
    failure: Failure = .{},
};

/// One DecideStream and the calls waiting on it. Freed by whoever drops the
/// last reference: the receiver thread holds one, each sending call another.
const Live = struct {
    stream: grpc.Stream,
    pending: std.AutoHashMapUnmanaged(u64, *Waiter) = .empty,
    refs: u32 = 1,
    send_mu: Io.Mutex = .init,
};

pub const StreamDecider = struct {
    client: *Client,
    mu: Io.Mutex = .init,
    /// Broadcast on every answer and when a stream is freed.
    cond: Io.Condition = .init,
    cur: ?*Live = null,
    next_id: u64 = 0,
    /// Streams not yet freed; destroy waits for 0.
    live: u32 = 0,
    stopping: bool = false,

    pub fn create(client: *Client) Allocator.Error!*StreamDecider {
        const s = try client.gpa.create(StreamDecider);
        s.* = .{ .client = client };
        return s;
    }

    /// Cancels the open stream and waits until its receiver has finished.
    pub fn destroy(s: *StreamDecider) void {
        const io = s.client.io;
        s.mu.lockUncancelable(io);
        s.stopping = true;
        if (s.cur) |l| {
            l.stream.cancel();
            s.cur = null;
        }
        while (s.live > 0) s.cond.waitUncancelable(io, &s.mu);
        s.mu.unlock(io);
        s.client.gpa.destroy(s);
    }

    fn unref(s: *StreamDecider, l: *Live) void {
        // Called with s.mu held.
        l.refs -= 1;
        if (l.refs > 0) return;
        l.pending.deinit(s.client.gpa);
        l.stream.deinit();
        s.client.gpa.destroy(l);
        s.live -= 1;
        s.cond.broadcast(s.client.io);
    }

    /// Registers a waiting call on the current stream, opening one when there is none.
    fn enqueue(s: *StreamDecider, w: *Waiter, f: *Failure) (Allocator.Error || error{Rpc})!struct { *Live, u64 } {
        const gpa = s.client.gpa;
        if (s.stopping) {
            f.set(.cancelled, "client is closing");
            return error.Rpc;
        }
        if (s.cur == null) {
            const l = try gpa.create(Live);
            errdefer gpa.destroy(l);
            l.* = .{ .stream = undefined };
            try l.stream.open(s.client.channel, decide_stream_method, 0);
            errdefer l.stream.deinit();
            const t = std.Thread.spawn(.{}, receive, .{ s, l }) catch {
                f.set(.internal, "cannot start the DecideStream receiver thread");
                return error.Rpc;
            };
            t.detach();
            s.live += 1;
            s.cur = l;
        }
        const l = s.cur.?;
        s.next_id += 1;
        try l.pending.put(gpa, s.next_id, w);
        l.refs += 1;
        return .{ l, s.next_id };
    }

    pub fn decide(s: *StreamDecider, req: model.DecideRequest, f: *Failure) (Allocator.Error || error{Rpc})!model.Decision {
        const io = s.client.io;
        const deadline = grpc.nowMs() + s.client.opts.decide_timeout_ms;
        var w: Waiter = .{};
        var arena = std.heap.ArenaAllocator.init(s.client.gpa);
        defer arena.deinit();

        s.mu.lockUncancelable(io);
        const l, const id = s.enqueue(&w, f) catch |err| {
            s.mu.unlock(io);
            return err;
        };
        s.mu.unlock(io);

        const payload = proto.encodeStreamDecide(arena.allocator(), id, req) catch |err| {
            s.mu.lockUncancelable(io);
            _ = l.pending.remove(id);
            s.unref(l);
            s.mu.unlock(io);
            return err;
        };
        l.send_mu.lockUncancelable(io);
        const sent = l.stream.send(payload, false) catch false;
        l.send_mu.unlock(io);

        s.mu.lockUncancelable(io);
        defer s.mu.unlock(io);
        // This call's reference keeps l (and its pending map) alive until it is done with them.
        defer s.unref(l);
        // On a failed send the receiver delivers the stream's real status to every waiting call.
        if (!sent) s.retire(l);
        while (!w.done) {
            const now = grpc.nowMs();
            if (now >= deadline) break;
            s.cond.waitTimeout(io, &s.mu, .{ .duration = .{ .raw = .{ .nanoseconds = @as(i96, deadline - now) * std.time.ns_per_ms }, .clock = .awake } }) catch {};
        }
        if (!w.done) {
            // Gave up; an answer arriving later is reported as cancelled by the receiver.
            _ = l.pending.remove(id);
            f.set(.deadline_exceeded, "Decide over DecideStream: deadline exceeded");
            return error.Rpc;
        }
        if (w.decision) |d| return d;
        f.* = w.failure;
        return error.Rpc;
    }

    fn retire(s: *StreamDecider, l: *Live) void {
        if (s.cur == l) s.cur = null;
        l.stream.cancel();
    }

    /// Hands each answer to the call waiting for it until the stream ends.
    fn receive(s: *StreamDecider, l: *Live) void {
        const io = s.client.io;
        const gpa = s.client.gpa;
        while (l.stream.recv()) |msg_| {
            var msg = msg_;
            defer msg.deinit();
            const bytes = msg.bytes();
            const r = c.decider__v1__decide_stream_response__unpack(null, bytes.len, bytes.ptr) orelse continue;
            defer c.decider__v1__decide_stream_response__free_unpacked(r, null);
            var late: ?model.Decision = null;
            {
                s.mu.lockUncancelable(io);
                defer s.mu.unlock(io);
                const w = l.pending.get(r.*.correlation_id);
                if (w != null) _ = l.pending.remove(r.*.correlation_id);
                const body = &r.*.unnamed_0;
                if (r.*.result_case == c.DECIDER__V1__DECIDE_STREAM_RESPONSE__RESULT_DECIDE) {
                    const d = proto.decisionOwned(gpa, body.decide) catch null;
                    if (w) |waiter| {
                        if (d) |dec| waiter.decision = dec else waiter.failure.set(.resource_exhausted, "out of memory decoding a decision");
                    } else late = d;
                } else if (w) |waiter| {
                    if (r.*.result_case == c.DECIDER__V1__DECIDE_STREAM_RESPONSE__RESULT_ERROR) {
                        const e = body.@"error";
                        waiter.failure.set(@enumFromInt(@as(u32, @intCast(e.*.code))), std.mem.span(e.*.message));
                        grpc.readStatusDetails(e, &waiter.failure);
                    } else waiter.failure.set(.internal, "DecideStreamResponse without a result");
                }
                if (w) |waiter| waiter.done = true;
                s.cond.broadcast(io);
            }
            if (late) |d_| {
                // Nobody waits for it any more: free its in-flight slot at once.
                var d = d_;
                defer d.deinit();
                s.client.reportOutcome(.{ .decision_id = d.id, .endpoint_id = d.endpoint.id, .result = .cancelled });
            }
        }
        var f: Failure = .{};
        const code = l.stream.finish(&f);
        if (code == .ok) f.set(.unavailable, "DecideStream ended");
        s.mu.lockUncancelable(io);
        defer s.mu.unlock(io);
        s.retire(l);
        var it = l.pending.valueIterator();
        while (it.next()) |w| {
            w.*.failure = f;
            w.*.done = true;
        }
        l.pending.clearRetainingCapacity();
        s.cond.broadcast(io);
        s.unref(l);
    }
};
