//! The client's local knowledge: endpoints seen in decisions or seeds, and the
//! WatchHealth stream's latest word on each. Fail-open picks from it.
const std = @import("std");
const model = @import("model.zig");

const Allocator = std.mem.Allocator;
const Io = std.Io;

const Known = struct {
    /// Owns every string in `endpoint` (one arena per endpoint, replaced whole).
    arena: std.heap.ArenaAllocator,
    endpoint: model.Endpoint,
};

const Health = struct {
    view: model.HealthView,
    /// Owned copy of the endpoint's model, for snapshots scoped to one model.
    model: []u8,
};

pub const View = struct {
    gpa: Allocator,
    io: Io,
    mu: Io.Mutex = .init,
    endpoints: std.StringHashMapUnmanaged(Known) = .empty,
    health: std.StringHashMapUnmanaged(Health) = .empty,
    /// WatchHealth snapshots applied; 0 means the view never synced with Decider.
    snapshots: std.atomic.Value(u64) = .init(0),
    /// Rotates fail-open picks across usable endpoints.
    next: std.atomic.Value(u64) = .init(0),

    pub fn init(gpa: Allocator, io: Io) View {
        return .{ .gpa = gpa, .io = io };
    }

    pub fn deinit(v: *View) void {
        var it = v.endpoints.iterator();
        while (it.next()) |e| e.value_ptr.arena.deinit();
        v.endpoints.deinit(v.gpa);
        var hit = v.health.iterator();
        while (hit.next()) |e| v.freeHealth(e.key_ptr.*, e.value_ptr.*);
        v.health.deinit(v.gpa);
    }

    fn freeHealth(v: *View, key: []const u8, h: Health) void {
        v.gpa.free(key);
        v.gpa.free(h.model);
    }

    /// Remembers endpoints (ones without an id or address are ignored).
    pub fn learn(v: *View, eps: []const model.Endpoint) Allocator.Error!void {
        v.mu.lockUncancelable(v.io);
        defer v.mu.unlock(v.io);
        for (eps) |ep| try v.learnLocked(ep);
    }

    fn learnLocked(v: *View, ep: model.Endpoint) Allocator.Error!void {
        if (ep.id.len == 0 or ep.address.len == 0) return;
        if (v.endpoints.getPtr(ep.id)) |old| {
            // Most decisions name endpoints already known: skip the copy when nothing changed.
            if (std.mem.eql(u8, old.endpoint.address, ep.address) and std.mem.eql(u8, old.endpoint.model, ep.model) and
                old.endpoint.capabilities.len == ep.capabilities.len) return;
        }
        var arena = std.heap.ArenaAllocator.init(v.gpa);
        errdefer arena.deinit();
        const a = arena.allocator();
        const caps = try a.alloc([]const u8, ep.capabilities.len);
        for (caps, ep.capabilities) |*dst, src| dst.* = try a.dupe(u8, src);
        const copy: model.Endpoint = .{
            .id = try a.dupe(u8, ep.id),
            .address = try a.dupe(u8, ep.address),
            .model = try a.dupe(u8, ep.model),
            .capabilities = caps,
            .weight = ep.weight,
        };
        const gop = try v.endpoints.getOrPut(v.gpa, ep.id);
        if (gop.found_existing) gop.value_ptr.arena.deinit();
        gop.key_ptr.* = copy.id;
        gop.value_ptr.* = .{ .arena = arena, .endpoint = copy };
    }

    pub const Event = struct {
        endpoint_id: []const u8,
        model: []const u8,
        view: model.HealthView,
        removed: bool,
    };

    /// Folds one WatchHealth response in. A snapshot replaces the health of
    /// every endpoint in `scope` ("" = all models).
    pub fn apply(v: *View, scope: []const u8, snapshot: bool, events: []const Event) Allocator.Error!void {
        v.mu.lockUncancelable(v.io);
        defer v.mu.unlock(v.io);
        if (snapshot) {
            var it = v.health.iterator();
            var stale: std.ArrayList([]const u8) = .empty;
            defer stale.deinit(v.gpa);
            while (it.next()) |e| {
                if (scope.len == 0 or std.mem.eql(u8, e.value_ptr.model, scope)) try stale.append(v.gpa, e.key_ptr.*);
            }
            for (stale.items) |key| {
                const kv = v.health.fetchRemove(key).?;
                v.freeHealth(kv.key, kv.value);
            }
        }
        for (events) |ev| {
            if (v.health.fetchRemove(ev.endpoint_id)) |kv| v.freeHealth(kv.key, kv.value);
            if (ev.removed) {
                if (v.endpoints.fetchRemove(ev.endpoint_id)) |kv| {
                    var arena = kv.value.arena;
                    arena.deinit();
                }
                continue;
            }
            const key = try v.gpa.dupe(u8, ev.endpoint_id);
            errdefer v.gpa.free(key);
            const model_copy = try v.gpa.dupe(u8, ev.model);
            errdefer v.gpa.free(model_copy);
            try v.health.put(v.gpa, key, .{ .view = ev.view, .model = model_copy });
        }
        if (snapshot) _ = v.snapshots.fetchAdd(1, .release);
    }

    pub fn healthOf(v: *View, endpoint_id: []const u8) ?model.HealthView {
        v.mu.lockUncancelable(v.io);
        defer v.mu.unlock(v.io);
        const h = v.health.get(endpoint_id) orelse return null;
        return h.view;
    }

    pub fn knownCount(v: *View) usize {
        v.mu.lockUncancelable(v.io);
        defer v.mu.unlock(v.io);
        return v.endpoints.count();
    }

    fn lessById(_: void, a: model.Endpoint, b: model.Endpoint) bool {
        return std.mem.lessThan(u8, a.id, b.id);
    }

    /// Known endpoints that could serve `req`, healthy ones first in an order that
    /// rotates on every call, degraded ones last, copied into `a`.
    pub fn usable(v: *View, a: Allocator, req: model.DecideRequest) Allocator.Error![]model.Endpoint {
        var healthy: std.ArrayList(model.Endpoint) = .empty;
        var degraded: std.ArrayList(model.Endpoint) = .empty;
        {
            v.mu.lockUncancelable(v.io);
            defer v.mu.unlock(v.io);
            var it = v.endpoints.valueIterator();
            while (it.next()) |k| {
                const ep = k.endpoint;
                if (!std.mem.eql(u8, ep.model, req.model) or contains(req.exclude_endpoint_ids, ep.id)) continue;
                if (!hasAll(ep.capabilities, req.required_capabilities)) continue;
                const copy = try copyInto(a, ep);
                if (v.health.get(ep.id)) |h| {
                    if (!h.view.usable()) continue;
                    if (h.view.status == .degraded) {
                        try degraded.append(a, copy);
                        continue;
                    }
                }
                try healthy.append(a, copy);
            }
        }
        std.mem.sort(model.Endpoint, healthy.items, {}, lessById);
        std.mem.sort(model.Endpoint, degraded.items, {}, lessById);
        if (healthy.items.len > 1) {
            const k = v.next.fetchAdd(1, .monotonic) % healthy.items.len;
            std.mem.rotate(model.Endpoint, healthy.items, k);
        }
        try healthy.appendSlice(a, degraded.items);
        return healthy.items;
    }
};

fn copyInto(a: Allocator, ep: model.Endpoint) Allocator.Error!model.Endpoint {
    const caps = try a.alloc([]const u8, ep.capabilities.len);
    for (caps, ep.capabilities) |*dst, src| dst.* = try a.dupe(u8, src);
    return .{ .id = try a.dupe(u8, ep.id), .address = try a.dupe(u8, ep.address), .model = try a.dupe(u8, ep.model), .capabilities = caps, .weight = ep.weight };
}

fn contains(list: []const []const u8, s: []const u8) bool {
    for (list) |x| if (std.mem.eql(u8, x, s)) return true;
    return false;
}

fn hasAll(have: []const []const u8, want: []const []const u8) bool {
    for (want) |w| if (!contains(have, w)) return false;
    return true;
}

test "fail-open order: unusable out, degraded last, healthy rotated" {
    const gpa = std.testing.allocator;
    var v = View.init(gpa, std.testing.io);
    defer v.deinit();
    try v.learn(&.{
        .{ .id = "a", .address = "127.0.0.1:1", .model = "m" },
        .{ .id = "b", .address = "127.0.0.1:2", .model = "m" },
        .{ .id = "c", .address = "127.0.0.1:3", .model = "m" },
        .{ .id = "d", .address = "127.0.0.1:4", .model = "m" },
        .{ .id = "e", .address = "127.0.0.1:5", .model = "other" },
        .{ .id = "", .address = "127.0.0.1:6", .model = "m" },
    });
    try v.apply("", true, &.{
        .{ .endpoint_id = "b", .model = "m", .view = .{ .status = .degraded, .breaker = .closed }, .removed = false },
        .{ .endpoint_id = "c", .model = "m", .view = .{ .status = .healthy, .breaker = .open }, .removed = false },
    });
    var arena = std.heap.ArenaAllocator.init(gpa);
    defer arena.deinit();
    const first = try v.usable(arena.allocator(), .{ .model = "m" });
    try std.testing.expectEqual(3, first.len);
    try std.testing.expectEqualStrings("b", first[2].id);
    const second = try v.usable(arena.allocator(), .{ .model = "m" });
    try std.testing.expect(!std.mem.eql(u8, first[0].id, second[0].id));
    const excluded = try v.usable(arena.allocator(), .{ .model = "m", .exclude_endpoint_ids = &.{ "a", "d" } });
    try std.testing.expectEqual(1, excluded.len);
    // A later snapshot without c forgets its open breaker; removal forgets d entirely.
    try v.apply("", true, &.{.{ .endpoint_id = "d", .model = "m", .view = .{ .status = .healthy, .breaker = .closed }, .removed = true }});
    try std.testing.expectEqual(3, (try v.usable(arena.allocator(), .{ .model = "m" })).len);
    try std.testing.expectEqual(2, v.snapshots.load(.acquire));
}
