//! An OpenAI-compatible reverse proxy that asks Decider where to send each
//! /v1/chat/completions request: the Zig twin of clients/go/cmd/example-gateway.
//! It forwards to the chosen endpoint, retries across the fallbacks (asking
//! again with exclude_endpoint_ids when they run out), relays server-sent
//! events unchanged, reads the usage tokens and reports every attempt's
//! outcome with its latency and time to first token.
const std = @import("std");
const decider = @import("decider");

const Allocator = std.mem.Allocator;
const Io = std.Io;
const http = std.http;

pub const chat_path = "/v1/chat/completions";
/// Bounds the request body the gateway keeps for retries.
const max_request_bytes = 16 << 20;
/// Bounds a non-streaming response body.
const max_response_bytes = 64 << 20;
/// Attempts when a decision carries no retry policy; a policy is capped at 16.
const default_attempts = 3;
const max_attempts_cap = 16;
const max_backoff_ms = 1000;

pub const Gateway = struct {
    gpa: Allocator,
    io: Io,
    client: *decider.Client,
    http_client: *http.Client,

    /// Serves one connection's requests until the peer closes it.
    pub fn serveConnection(g: *Gateway, stream: Io.net.Stream) void {
        defer stream.close(g.io);
        var in_buf: [64 * 1024]u8 = undefined;
        var out_buf: [16 * 1024]u8 = undefined;
        var reader = stream.reader(g.io, &in_buf);
        var writer = stream.writer(g.io, &out_buf);
        var server = http.Server.init(&reader.interface, &writer.interface);
        while (true) {
            var req = server.receiveHead() catch return;
            g.handle(&req) catch return;
            if (!req.head.keep_alive) return;
        }
    }

    fn handle(g: *Gateway, req: *http.Server.Request) !void {
        const target = req.head.target;
        if (std.mem.eql(u8, target, "/healthz")) return req.respond("ok\n", .{});
        if (!std.mem.eql(u8, target, chat_path)) return respondError(req, .not_found, "not_found", "only " ++ chat_path ++ " is proxied", &.{});
        if (req.head.method != .POST) return respondError(req, .method_not_allowed, "method_not_allowed", "use POST", &.{.{ .name = "allow", .value = "POST" }});
        var arena_state = std.heap.ArenaAllocator.init(g.gpa);
        defer arena_state.deinit();
        try g.chat(arena_state.allocator(), req);
    }

    /// What the gateway reads from the incoming request before its body.
    const Incoming = struct {
        session: []const u8 = "",
        tenant: []const u8 = "",
        request_id: []const u8 = "",
        authorization: []const u8 = "",
    };

    fn chat(g: *Gateway, a: Allocator, req: *http.Server.Request) !void {
        var in: Incoming = .{};
        var it = req.iterateHeaders();
        while (it.next()) |h| {
            const v = try a.dupe(u8, h.value);
            if (std.ascii.eqlIgnoreCase(h.name, "x-session-id")) in.session = v;
            if (std.ascii.eqlIgnoreCase(h.name, "x-tenant")) in.tenant = v;
            if (std.ascii.eqlIgnoreCase(h.name, "x-request-id")) in.request_id = v;
            if (std.ascii.eqlIgnoreCase(h.name, "authorization")) in.authorization = v;
        }
        if (req.head.content_length) |n| if (n > max_request_bytes)
            return respondError(req, .payload_too_large, "invalid_request_error", "request body over 16 MiB", &.{});
        var body_buf: [8192]u8 = undefined;
        const body_reader = req.readerExpectContinue(&body_buf) catch
            return respondError(req, .expectation_failed, "invalid_request_error", "unsupported Expect header", &.{});
        const body = body_reader.allocRemaining(a, .limited(max_request_bytes)) catch
            return respondError(req, .bad_request, "invalid_request_error", "request body unreadable or over 16 MiB", &.{});

        const parsed = std.json.parseFromSliceLeaky(std.json.Value, a, body, .{}) catch
            return respondError(req, .bad_request, "invalid_request_error", "body is not JSON", &.{});
        if (parsed != .object) return respondError(req, .bad_request, "invalid_request_error", "body is not a JSON object", &.{});
        const model_v = parsed.object.get("model") orelse std.json.Value{ .null = {} };
        if (model_v != .string or model_v.string.len == 0) return respondError(req, .bad_request, "invalid_request_error", "model is required", &.{});
        if (in.session.len == 0) if (parsed.object.get("user")) |u| if (u == .string) {
            in.session = u.string;
        };
        const text = try decider.prefix.promptText(a, parsed);

        const dreq: decider.DecideRequest = .{
            .model = model_v.string,
            .request_id = in.request_id,
            .session_id = in.session,
            .tenant = in.tenant,
            .estimated_input_tokens = decider.prefix.estimateTokens(text),
            .prefix_hashes = try decider.prefix.hashes(a, text, decider.prefix.max_blocks),
        };
        var p: Proxy = .{ .g = g, .a = a, .req = req, .body = body, .in = in };
        p.route(dreq) catch |err| {
            if (p.committed) return;
            return p.fail(err);
        };
    }
};

const Proxy = struct {
    g: *Gateway,
    a: Allocator,
    req: *http.Server.Request,
    body: []u8,
    in: Gateway.Incoming,
    tried: std.ArrayList([]const u8) = .empty,
    committed: bool = false,
    /// HTTP status of the last endpoint that answered with a retryable error.
    last_status: u16 = 0,
    failure: decider.Failure = .{},

    const RouteError = decider.Error || error{ AttemptsExhausted, ClientGone };

    /// Decide, then try the endpoint and its fallbacks in order; when they run
    /// out while attempts remain, Decide again without the endpoints tried.
    fn route(p: *Proxy, first: decider.DecideRequest) RouteError!void {
        var dec = try p.g.client.decide(first, &p.failure);
        defer dec.deinit();
        var attempts: usize = if (dec.retry.max_attempts > 0) @min(dec.retry.max_attempts, max_attempts_cap) else default_attempts;
        var backoff_ms: u64 = @min(dec.retry.initial_backoff_ms, max_backoff_ms);
        const multiplier: f64 = if (dec.retry.backoff_multiplier >= 1) dec.retry.backoff_multiplier else 2;
        var decides: usize = 1;
        var queue: std.ArrayList(decider.Endpoint) = .empty;
        try p.refill(&queue, &dec);
        while (p.tried.items.len < attempts) {
            if (queue.items.len == 0) {
                // Decider keeps naming endpoints already tried; stop asking.
                if (decides >= attempts) break;
                decides += 1;
                var again = first;
                again.exclude_endpoint_ids = p.tried.items;
                const next = p.g.client.decide(again, &p.failure) catch return error.AttemptsExhausted;
                dec.deinit();
                dec = next;
                if (dec.retry.max_attempts > 0) attempts = @min(dec.retry.max_attempts, max_attempts_cap);
                try p.refill(&queue, &dec);
                continue;
            }
            const ep = queue.orderedRemove(0);
            if (p.wasTried(ep.id)) continue;
            if (p.tried.items.len > 0 and backoff_ms > 0) {
                p.g.io.sleep(.fromMilliseconds(@intCast(backoff_ms)), .awake) catch {};
                backoff_ms = @min(@as(u64, @intFromFloat(@as(f64, @floatFromInt(backoff_ms)) * multiplier)), max_backoff_ms);
            }
            try p.tried.append(p.a, ep.id);
            const start = decider.nowNs();
            const at = p.attempt(ep, start);
            p.g.client.reportOutcome(.{
                .decision_id = dec.id,
                .endpoint_id = ep.id,
                .result = at.result,
                .latency_ns = decider.nowNs() - start,
                .input_tokens = at.input_tokens,
                .output_tokens = at.output_tokens,
                .ttft_ns = at.ttft_ns,
            });
            if (at.result == .success or at.final) return;
        }
        return error.AttemptsExhausted;
    }

    fn refill(p: *Proxy, queue: *std.ArrayList(decider.Endpoint), dec: *const decider.Decision) Allocator.Error!void {
        queue.clearRetainingCapacity();
        // Copies: the decision is freed when a new one replaces it.
        try queue.append(p.a, try copyEndpoint(p.a, dec.endpoint));
        for (dec.fallbacks) |f| try queue.append(p.a, try copyEndpoint(p.a, f));
    }

    fn wasTried(p: *Proxy, id: []const u8) bool {
        for (p.tried.items) |t| if (std.mem.eql(u8, t, id)) return true;
        return false;
    }

    const Attempt = struct {
        result: decider.Result,
        input_tokens: u32 = 0,
        output_tokens: u32 = 0,
        ttft_ns: u64 = 0,
        /// Stop retrying: the response already reached the client, or the failure is the request's own.
        final: bool = false,
    };

    /// Sends the request to one endpoint. Everything before the response is
    /// committed to the client can be retried elsewhere.
    fn attempt(p: *Proxy, ep: decider.Endpoint, start: u64) Attempt {
        const url = std.fmt.allocPrint(p.a, "http://{s}" ++ chat_path, .{ep.address}) catch return .{ .result = .@"error" };
        const uri = std.Uri.parse(url) catch return .{ .result = .@"error" };
        var extra: [2]http.Header = undefined;
        var n_extra: usize = 0;
        if (p.in.authorization.len > 0) {
            extra[n_extra] = .{ .name = "authorization", .value = p.in.authorization };
            n_extra += 1;
        }
        if (p.in.request_id.len > 0) {
            extra[n_extra] = .{ .name = "x-request-id", .value = p.in.request_id };
            n_extra += 1;
        }
        var up = p.g.http_client.request(.POST, uri, .{
            .redirect_behavior = .unhandled,
            .headers = .{ .content_type = .{ .override = "application/json" } },
            .extra_headers = extra[0..n_extra],
        }) catch return .{ .result = .@"error" };
        defer up.deinit();
        up.sendBodyComplete(p.body) catch return .{ .result = .@"error" };
        var resp = up.receiveHead(&.{}) catch return .{ .result = .@"error" };
        const code: u16 = @intFromEnum(resp.head.status);
        switch (code) {
            429 => {
                p.last_status = code;
                return .{ .result = .rate_limited };
            },
            408, 504 => {
                p.last_status = code;
                return .{ .result = .timeout };
            },
            // 404: this endpoint does not serve the path or the model; try another.
            404, 500...503, 505...599 => {
                p.last_status = code;
                return .{ .result = .@"error" };
            },
            else => {},
        }
        const sse = if (resp.head.content_type) |ct| std.mem.startsWith(u8, ct, "text/event-stream") else false;
        const ctype = p.a.dupe(u8, resp.head.content_type orelse "application/json") catch return .{ .result = .@"error" };
        var transfer: [16 * 1024]u8 = undefined;
        const body = resp.reader(&transfer);
        if (sse) return p.relayStream(code, ctype, ep, body, start);

        const data = body.allocRemaining(p.a, .limited(max_response_bytes)) catch return .{ .result = .@"error" };
        const u = if (code < 300) usageOf(p.a, data) else Usage{};
        p.committed = true;
        const headers = p.responseHeaders(ctype, ep) catch return .{ .result = .success, .final = true };
        p.req.respond(data, .{ .status = @enumFromInt(code), .extra_headers = headers }) catch {};
        return .{ .result = .success, .final = true, .input_tokens = u.prompt_tokens, .output_tokens = u.completion_tokens };
    }

    fn responseHeaders(p: *Proxy, ctype: []const u8, ep: decider.Endpoint) Allocator.Error![]const http.Header {
        const attempts = try std.fmt.allocPrint(p.a, "{d}", .{p.tried.items.len});
        const hs = try p.a.alloc(http.Header, 3);
        hs[0] = .{ .name = "content-type", .value = ctype };
        hs[1] = .{ .name = "x-decider-endpoint", .value = ep.id };
        hs[2] = .{ .name = "x-decider-attempts", .value = attempts };
        return hs;
    }

    /// Relays server-sent events line by line, flushing at the end of each
    /// event, and picks the usage out of the chunk that carries it.
    fn relayStream(p: *Proxy, code: u16, ctype: []const u8, ep: decider.Endpoint, body: *Io.Reader, start: u64) Attempt {
        p.committed = true;
        var at: Attempt = .{ .result = .success, .final = true };
        const headers = p.responseHeaders(ctype, ep) catch return at;
        var out_buf: [16 * 1024]u8 = undefined;
        var w = p.req.respondStreaming(&out_buf, .{ .respond_options = .{ .status = @enumFromInt(code), .extra_headers = headers } }) catch {
            at.result = .cancelled;
            return at;
        };
        while (true) {
            const line = body.takeDelimiterInclusive('\n') catch |err| switch (err) {
                error.EndOfStream => {
                    // A last line without its newline still goes to the client.
                    const rest = body.buffered();
                    if (rest.len > 0) {
                        w.writer.writeAll(rest) catch {};
                        body.tossBuffered();
                    }
                    break;
                },
                else => {
                    at.result = .@"error";
                    break;
                },
            };
            if (at.ttft_ns == 0) at.ttft_ns = decider.nowNs() - start;
            if (std.mem.startsWith(u8, line, "data: ") and std.mem.indexOf(u8, line, "\"usage\"") != null) {
                const u = usageOf(p.a, std.mem.trim(u8, line["data: ".len..], " \r\n"));
                if (u.prompt_tokens != 0 or u.completion_tokens != 0) {
                    at.input_tokens = u.prompt_tokens;
                    at.output_tokens = u.completion_tokens;
                }
            }
            w.writer.writeAll(line) catch {
                // The client went away mid-stream: says nothing about the endpoint.
                at.result = .cancelled;
                return at;
            };
            if (std.mem.trim(u8, line, "\r\n").len == 0) w.flush() catch {
                at.result = .cancelled;
                return at;
            };
        }
        w.end() catch {};
        return at;
    }

    /// Answers when no endpoint produced a response the client can see.
    fn fail(p: *Proxy, err: RouteError) !void {
        const msg = p.failure.message();
        const attempts = try std.fmt.allocPrint(p.a, "{d}", .{p.tried.items.len});
        const hdr_attempts: []const http.Header = &.{.{ .name = "x-decider-attempts", .value = attempts }};
        switch (err) {
            error.AttemptsExhausted => {
                const text = try std.fmt.allocPrint(p.a, "every attempt failed ({d} tried)", .{p.tried.items.len});
                if (p.last_status == 429) return respondError(p.req, .too_many_requests, "rate_limit_error", text, hdr_attempts);
                return respondError(p.req, .bad_gateway, "upstream_error", text, hdr_attempts);
            },
            error.DeciderUnreachable => return respondError(p.req, .service_unavailable, "router_unavailable", msg, &.{}),
            error.NotFound => return respondError(p.req, .not_found, "model_not_found", msg, &.{}),
            error.QuotaExceeded => {
                const secs = try std.fmt.allocPrint(p.a, "{d}", .{(p.failure.retry_after_ms + 999) / 1000});
                const hs: []const http.Header = if (p.failure.retry_after_ms > 0) &.{.{ .name = "retry-after", .value = secs }} else &.{};
                return respondError(p.req, .too_many_requests, "rate_limit_error", msg, hs);
            },
            error.InvalidArgument => return respondError(p.req, .bad_request, "invalid_request_error", msg, &.{}),
            error.NoHealthyEndpoint => return respondError(p.req, .service_unavailable, "no_healthy_endpoint", msg, &.{}),
            else => return respondError(p.req, .bad_gateway, "upstream_error", @errorName(err), &.{}),
        }
    }
};

fn copyEndpoint(a: Allocator, ep: decider.Endpoint) Allocator.Error!decider.Endpoint {
    return .{ .id = try a.dupe(u8, ep.id), .address = try a.dupe(u8, ep.address), .model = try a.dupe(u8, ep.model) };
}

const Usage = struct {
    prompt_tokens: u32 = 0,
    completion_tokens: u32 = 0,
};

fn usageOf(a: Allocator, data: []const u8) Usage {
    const v = std.json.parseFromSliceLeaky(std.json.Value, a, data, .{}) catch return .{};
    if (v != .object) return .{};
    const u = v.object.get("usage") orelse return .{};
    if (u != .object) return .{};
    return .{ .prompt_tokens = tokenCount(u.object.get("prompt_tokens")), .completion_tokens = tokenCount(u.object.get("completion_tokens")) };
}

fn tokenCount(v: ?std.json.Value) u32 {
    const x = v orelse return 0;
    return if (x == .integer and x.integer >= 0) @intCast(@min(x.integer, std.math.maxInt(u32))) else 0;
}

/// An OpenAI-style error body: {"error": {"message", "type", "code"}}.
fn respondError(req: *http.Server.Request, status: http.Status, kind: []const u8, msg: []const u8, extra: []const http.Header) !void {
    var buf: [1024]u8 = undefined;
    var w: Io.Writer = .fixed(&buf);
    w.print("{{\"error\":{{\"message\":{f},\"type\":\"{s}\",\"code\":\"{d}\"}}}}\n", .{ std.json.fmt(msg, .{}), kind, @intFromEnum(status) }) catch {};
    var headers: [4]http.Header = undefined;
    headers[0] = .{ .name = "content-type", .value = "application/json" };
    const n = @min(extra.len, headers.len - 1);
    @memcpy(headers[1 .. 1 + n], extra[0..n]);
    try req.respond(w.buffered(), .{ .status = status, .extra_headers = headers[0 .. 1 + n] });
}
