//! The thin layer over gRPC's C core: a channel with plaintext or TLS
//! credentials, unary calls and streams on a pluck completion queue, and the
//! call's final status read into a `Failure` (grpc-status-details-bin parsed
//! for ErrorInfo and RetryInfo). Nothing above this file touches grpc_* calls.
const std = @import("std");
const c = @import("c");
const status = @import("status.zig");

const Failure = status.Failure;

/// TLS through the C core's SSL credentials. Every field is optional: with
/// none set the channel verifies the server against the system roots.
pub const Tls = struct {
    /// PEM roots to verify the server with (a private CA, or the server's self-signed certificate).
    root_certs_pem: ?[:0]const u8 = null,
    /// Client certificate and key, for servers that ask for mutual TLS.
    cert_chain_pem: ?[:0]const u8 = null,
    private_key_pem: ?[:0]const u8 = null,
    /// Name to verify in the server's certificate instead of the target host (tests, IP targets).
    server_name_override: ?[:0]const u8 = null,
};

pub const Credentials = union(enum) {
    plaintext,
    tls: Tls,
};

var initialised = std.atomic.Value(bool).init(false);

/// The C core stays initialised for the life of the process: grpc_shutdown waits
/// for its own threads, and a library must not decide when that happens.
/// grpc_init is reference-counted and thread-safe, so a race here only counts twice.
fn initGrpc() void {
    if (initialised.load(.acquire)) return;
    c.grpc_init();
    initialised.store(true, .release);
}

pub const Channel = struct {
    raw: *c.grpc_channel,

    pub fn open(target: [:0]const u8, creds: Credentials) error{ OutOfMemory, TlsSetup }!Channel {
        initGrpc();
        const cc = switch (creds) {
            .plaintext => c.grpc_insecure_credentials_create(),
            .tls => |t| blk: {
                var pair: c.grpc_ssl_pem_key_cert_pair = .{
                    .private_key = if (t.private_key_pem) |k| k.ptr else null,
                    .cert_chain = if (t.cert_chain_pem) |k| k.ptr else null,
                };
                const have_pair = t.private_key_pem != null and t.cert_chain_pem != null;
                break :blk c.grpc_ssl_credentials_create(
                    if (t.root_certs_pem) |r| r.ptr else null,
                    if (have_pair) &pair else null,
                    null,
                    null,
                ) orelse return error.TlsSetup;
            },
        } orelse return error.OutOfMemory;
        defer c.grpc_channel_credentials_release(cc);

        var arg: c.grpc_arg = std.mem.zeroes(c.grpc_arg);
        var args: c.grpc_channel_args = .{ .num_args = 0, .args = &arg };
        if (creds == .tls) if (creds.tls.server_name_override) |name| {
            arg.type = c.GRPC_ARG_STRING;
            arg.key = @constCast("grpc.ssl_target_name_override");
            arg.value.string = @constCast(name.ptr);
            args.num_args = 1;
        };
        const raw = c.grpc_channel_create(target.ptr, cc, &args) orelse return error.OutOfMemory;
        return .{ .raw = raw };
    }

    pub fn close(ch: Channel) void {
        c.grpc_channel_destroy(ch.raw);
    }
};

/// A deadline `timeout_ms` from now on the monotonic clock.
fn deadlineIn(timeout_ms: u64) c.gpr_timespec {
    return c.gpr_time_add(
        c.gpr_now(c.GPR_CLOCK_MONOTONIC),
        c.gpr_time_from_millis(@intCast(@min(timeout_ms, std.math.maxInt(i32))), c.GPR_TIMESPAN),
    );
}

/// Monotonic milliseconds, for latencies and fail-open bookkeeping.
pub fn nowMs() u64 {
    const t = c.gpr_now(c.GPR_CLOCK_MONOTONIC);
    return @as(u64, @intCast(t.tv_sec)) * 1000 + @as(u64, @intCast(t.tv_nsec)) / 1_000_000;
}

/// Monotonic nanoseconds, for latencies.
pub fn nowNs() u64 {
    const t = c.gpr_now(c.GPR_CLOCK_MONOTONIC);
    return @as(u64, @intCast(t.tv_sec)) * 1_000_000_000 + @as(u64, @intCast(t.tv_nsec));
}

fn sliceBytes(s: *const c.grpc_slice) []const u8 {
    if (s.refcount != null) return s.data.refcounted.bytes[0..s.data.refcounted.length];
    return s.data.inlined.bytes[0..s.data.inlined.length];
}

/// One received message: its bytes stay valid until deinit.
pub const Message = struct {
    slice: c.grpc_slice,

    pub fn bytes(m: *const Message) []const u8 {
        return sliceBytes(&m.slice);
    }

    pub fn deinit(m: *Message) void {
        c.grpc_slice_unref(m.slice);
    }

    fn fromBuffer(bb: *c.grpc_byte_buffer) Message {
        defer c.grpc_byte_buffer_destroy(bb);
        var reader: c.grpc_byte_buffer_reader = undefined;
        // Fails only for a compressed buffer the core cannot inflate; it inflates gzip/deflate.
        if (c.grpc_byte_buffer_reader_init(&reader, bb) == 0) return .{ .slice = c.grpc_empty_slice() };
        defer c.grpc_byte_buffer_reader_destroy(&reader);
        return .{ .slice = c.grpc_byte_buffer_reader_readall(&reader) };
    }
};

fn byteBuffer(payload: []const u8) error{OutOfMemory}!*c.grpc_byte_buffer {
    var slice = c.grpc_slice_from_copied_buffer(payload.ptr, payload.len);
    defer c.grpc_slice_unref(slice);
    return c.grpc_raw_byte_buffer_create(&slice, 1) orelse error.OutOfMemory;
}

/// The status part of a finished call, owned by the call until `read` copies it out.
const StatusOp = struct {
    code: c.grpc_status_code = c.GRPC_STATUS_OK,
    details: c.grpc_slice = undefined,
    trailing: c.grpc_metadata_array = undefined,

    fn init(s: *StatusOp) void {
        s.details = c.grpc_empty_slice();
        c.grpc_metadata_array_init(&s.trailing);
    }

    fn op(s: *StatusOp) c.grpc_op {
        var o = std.mem.zeroes(c.grpc_op);
        o.op = c.GRPC_OP_RECV_STATUS_ON_CLIENT;
        o.data.recv_status_on_client.trailing_metadata = &s.trailing;
        o.data.recv_status_on_client.status = &s.code;
        o.data.recv_status_on_client.status_details = &s.details;
        return o;
    }

    /// Fills `f` and returns the code; frees what the call handed over.
    fn read(s: *StatusOp, f: *Failure) status.Code {
        defer {
            c.grpc_slice_unref(s.details);
            c.grpc_metadata_array_destroy(&s.trailing);
        }
        const code: status.Code = @enumFromInt(@as(u32, @intCast(s.code)));
        f.set(code, sliceBytes(&s.details));
        // An empty array has a null pointer.
        if (s.trailing.count > 0) for (s.trailing.metadata[0..s.trailing.count]) |*md| {
            if (std.mem.eql(u8, sliceBytes(&md.key), "grpc-status-details-bin")) {
                readDetails(sliceBytes(&md.value), f);
            }
        };
        return code;
    }
};

/// Reads a google.rpc.Status (decider.v1.Status is its wire twin) for the
/// ErrorInfo reason and the RetryInfo delay. Unparseable details are ignored:
/// the code and message already say what happened.
pub fn readDetails(bytes: []const u8, f: *Failure) void {
    const st = c.decider__v1__status__unpack(null, bytes.len, bytes.ptr) orelse return;
    defer c.decider__v1__status__free_unpacked(st, null);
    readStatusDetails(st, f);
}

/// Reads ErrorInfo and RetryInfo out of an unpacked status's details.
pub fn readStatusDetails(st: *const c.Decider__V1__Status, f: *Failure) void {
    for (0..st.n_details) |i| {
        const any = st.details[i];
        const type_url = std.mem.span(any.*.type_url);
        const value = any.*.value;
        if (std.mem.endsWith(u8, type_url, "/google.rpc.ErrorInfo")) {
            const info = c.decider__zig__rpc__error_info__unpack(null, value.len, value.data) orelse continue;
            defer c.decider__zig__rpc__error_info__free_unpacked(info, null);
            f.setReason(std.mem.span(info.*.reason));
        } else if (std.mem.endsWith(u8, type_url, "/google.rpc.RetryInfo")) {
            const info = c.decider__zig__rpc__retry_info__unpack(null, value.len, value.data) orelse continue;
            defer c.decider__zig__rpc__retry_info__free_unpacked(info, null);
            if (info.*.retry_delay) |d| {
                f.retry_after_ms = @as(u64, @intCast(@max(d.*.seconds, 0))) * 1000 +
                    @as(u64, @intCast(@max(d.*.nanos, 0))) / 1_000_000;
            }
        }
    }
}

/// A pluck completion queue for one call: the calling thread drives it, and a
/// second thread may pluck a different tag on it (send vs receive on a stream).
const Queue = struct {
    raw: *c.grpc_completion_queue,

    fn create() error{OutOfMemory}!Queue {
        return .{ .raw = c.grpc_completion_queue_create_for_pluck(null) orelse return error.OutOfMemory };
    }

    fn wait(q: Queue, tag: *anyopaque) bool {
        const ev = c.grpc_completion_queue_pluck(q.raw, tag, c.gpr_inf_future(c.GPR_CLOCK_REALTIME), null);
        return ev.type == c.GRPC_OP_COMPLETE and ev.success != 0;
    }

    fn destroy(q: Queue) void {
        c.grpc_completion_queue_shutdown(q.raw);
        while (true) {
            const ev = c.grpc_completion_queue_pluck(q.raw, null, c.gpr_inf_future(c.GPR_CLOCK_REALTIME), null);
            if (ev.type == c.GRPC_QUEUE_SHUTDOWN) break;
        }
        c.grpc_completion_queue_destroy(q.raw);
    }
};

/// Completion queues kept for unary calls to reuse. A unary call leaves its queue
/// empty (it plucks its one batch to completion), so the next call can take it
/// as it is, instead of creating and shutting down a queue every time.
pub const QueuePool = struct {
    mu: c.gpr_mu = undefined,
    free: [32]?*c.grpc_completion_queue = @splat(null),
    len: usize = 0,

    pub fn init(p: *QueuePool) void {
        p.* = .{};
        c.gpr_mu_init(&p.mu);
    }

    pub fn deinit(p: *QueuePool) void {
        for (p.free[0..p.len]) |q| (Queue{ .raw = q.? }).destroy();
        c.gpr_mu_destroy(&p.mu);
    }

    fn take(p: *QueuePool) error{OutOfMemory}!Queue {
        c.gpr_mu_lock(&p.mu);
        if (p.len > 0) {
            p.len -= 1;
            const q = p.free[p.len].?;
            c.gpr_mu_unlock(&p.mu);
            return .{ .raw = q };
        }
        c.gpr_mu_unlock(&p.mu);
        return Queue.create();
    }

    /// Keeps the queue for the next call, or destroys it when the pool is full.
    fn give(p: *QueuePool, q: Queue) void {
        c.gpr_mu_lock(&p.mu);
        if (p.len < p.free.len) {
            p.free[p.len] = q.raw;
            p.len += 1;
            c.gpr_mu_unlock(&p.mu);
            return;
        }
        c.gpr_mu_unlock(&p.mu);
        q.destroy();
    }
};

fn createCall(ch: Channel, q: Queue, method: [:0]const u8, deadline: c.gpr_timespec) error{OutOfMemory}!*c.grpc_call {
    return c.grpc_channel_create_call(ch.raw, null, 0, q.raw, c.grpc_slice_from_static_string(method.ptr), null, deadline, null) orelse error.OutOfMemory;
}

/// Starts a batch; false when the core refused it (a call already finished), so no completion will come.
fn startBatch(call: *c.grpc_call, ops: []const c.grpc_op, tag: *anyopaque) bool {
    return c.grpc_call_start_batch(call, ops.ptr, ops.len, tag, null) == c.GRPC_CALL_OK;
}

pub const CallError = error{ OutOfMemory, Rpc };

/// One unary call within `timeout_ms`, on a queue from `pool`. On a non-OK status fills `f` and returns error.Rpc.
pub fn unary(ch: Channel, pool: *QueuePool, method: [:0]const u8, request: []const u8, timeout_ms: u64, f: *Failure) CallError!Message {
    const q = try pool.take();
    defer pool.give(q);
    const call = try createCall(ch, q, method, deadlineIn(timeout_ms));
    defer c.grpc_call_unref(call);
    const send = try byteBuffer(request);
    defer c.grpc_byte_buffer_destroy(send);

    var initial: c.grpc_metadata_array = undefined;
    c.grpc_metadata_array_init(&initial);
    defer c.grpc_metadata_array_destroy(&initial);
    var recv: ?*c.grpc_byte_buffer = null;
    var st: StatusOp = .{};
    st.init();

    var ops: [6]c.grpc_op = @splat(std.mem.zeroes(c.grpc_op));
    ops[0].op = c.GRPC_OP_SEND_INITIAL_METADATA;
    ops[1].op = c.GRPC_OP_SEND_MESSAGE;
    ops[1].data.send_message.send_message = send;
    ops[2].op = c.GRPC_OP_SEND_CLOSE_FROM_CLIENT;
    ops[3].op = c.GRPC_OP_RECV_INITIAL_METADATA;
    ops[3].data.recv_initial_metadata.recv_initial_metadata = &initial;
    ops[4].op = c.GRPC_OP_RECV_MESSAGE;
    ops[4].data.recv_message.recv_message = &recv;
    ops[5] = st.op();
    var tag: u8 = 0;
    if (!startBatch(call, &ops, &tag)) {
        f.set(.internal, "the C core refused the call's operations");
        return error.Rpc;
    }
    _ = q.wait(&tag);
    const code = st.read(f);
    if (code != .ok or recv == null) {
        if (recv) |bb| c.grpc_byte_buffer_destroy(bb);
        if (code == .ok) f.set(.internal, "OK status without a response message");
        return error.Rpc;
    }
    return Message.fromBuffer(recv.?);
}

/// A streaming call: one thread may `send` while another runs `recv`; `cancel`
/// may come from any thread. `finish` reads the status after `recv` returned null.
pub const Stream = struct {
    call: *c.grpc_call,
    queue: Queue,
    send_tag: u8 = 0,
    recv_tag: u8 = 0,
    initial: c.grpc_metadata_array = undefined,
    got_initial: bool = false,
    closed: bool = false,

    /// Opens `method` with a deadline `timeout_ms` away (0: none).
    pub fn open(s: *Stream, ch: Channel, method: [:0]const u8, timeout_ms: u64) error{OutOfMemory}!void {
        const q = try Queue.create();
        errdefer q.destroy();
        const deadline = if (timeout_ms == 0) c.gpr_inf_future(c.GPR_CLOCK_MONOTONIC) else deadlineIn(timeout_ms);
        s.* = .{ .call = try createCall(ch, q, method, deadline), .queue = q };
        c.grpc_metadata_array_init(&s.initial);
        var op = std.mem.zeroes(c.grpc_op);
        op.op = c.GRPC_OP_SEND_INITIAL_METADATA;
        if (startBatch(s.call, (&op)[0..1], &s.send_tag)) _ = s.queue.wait(&s.send_tag);
    }

    /// Sends one message (and with `last`, half-closes); false when the stream is broken.
    pub fn send(s: *Stream, payload: []const u8, last: bool) error{OutOfMemory}!bool {
        const bb = try byteBuffer(payload);
        defer c.grpc_byte_buffer_destroy(bb);
        var ops: [2]c.grpc_op = @splat(std.mem.zeroes(c.grpc_op));
        ops[0].op = c.GRPC_OP_SEND_MESSAGE;
        ops[0].data.send_message.send_message = bb;
        ops[1].op = c.GRPC_OP_SEND_CLOSE_FROM_CLIENT;
        if (!startBatch(s.call, ops[0..if (last) 2 else 1], &s.send_tag)) return false;
        return s.queue.wait(&s.send_tag);
    }

    /// The next message, or null when the server finished or the stream broke.
    pub fn recv(s: *Stream) ?Message {
        var bb: ?*c.grpc_byte_buffer = null;
        var ops: [2]c.grpc_op = @splat(std.mem.zeroes(c.grpc_op));
        var n: usize = 0;
        if (!s.got_initial) {
            // Initial metadata arrives with the first message; asking for it here
            // keeps `open` from waiting on a server that answers only later.
            ops[n].op = c.GRPC_OP_RECV_INITIAL_METADATA;
            ops[n].data.recv_initial_metadata.recv_initial_metadata = &s.initial;
            n += 1;
            s.got_initial = true;
        }
        ops[n].op = c.GRPC_OP_RECV_MESSAGE;
        ops[n].data.recv_message.recv_message = &bb;
        n += 1;
        if (!startBatch(s.call, ops[0..n], &s.recv_tag)) return null;
        _ = s.queue.wait(&s.recv_tag);
        return if (bb) |b| Message.fromBuffer(b) else null;
    }

    /// The call's status; call after `recv` returned null.
    pub fn finish(s: *Stream, f: *Failure) status.Code {
        var st: StatusOp = .{};
        st.init();
        var op = st.op();
        if (!startBatch(s.call, (&op)[0..1], &s.recv_tag)) {
            c.grpc_slice_unref(st.details);
            c.grpc_metadata_array_destroy(&st.trailing);
            f.set(.internal, "the C core refused to read the stream's status");
            return .internal;
        }
        _ = s.queue.wait(&s.recv_tag);
        return st.read(f);
    }

    /// Ends the call from any thread: pending and later operations fail, `recv` returns null.
    pub fn cancel(s: *Stream) void {
        _ = c.grpc_call_cancel(s.call, null);
    }

    pub fn deinit(s: *Stream) void {
        c.grpc_call_unref(s.call);
        c.grpc_metadata_array_destroy(&s.initial);
        s.queue.destroy();
    }
};
