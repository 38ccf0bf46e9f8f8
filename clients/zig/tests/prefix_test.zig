//! The Zig prefix hashes against the shared vectors (testdata/prefix_hash_vectors.json).
const std = @import("std");
const decider = @import("decider");
const harness = @import("harness.zig");

const testing = std.testing;
const prefix = decider.prefix;

test "prefix hashes match every shared vector" {
    const gpa = testing.allocator;
    const io = testing.io;
    const root = try harness.repoRoot(gpa, io);
    defer gpa.free(root);
    const path = try std.fs.path.join(gpa, &.{ root, "testdata", "prefix_hash_vectors.json" });
    defer gpa.free(path);
    const data = try std.Io.Dir.cwd().readFileAlloc(io, path, gpa, .limited(4 << 20));
    defer gpa.free(data);
    const parsed = try std.json.parseFromSlice(std.json.Value, gpa, data, .{});
    defer parsed.deinit();

    const vectors = parsed.value.object.get("vectors").?.array.items;
    try testing.expect(vectors.len >= 10);
    try testing.expectEqual(@as(i64, prefix.block_bytes), parsed.value.object.get("block_bytes").?.integer);
    try testing.expectEqual(@as(i64, prefix.max_blocks), parsed.value.object.get("default_max_blocks").?.integer);
    for (vectors) |v| {
        const name = v.object.get("name").?.string;
        errdefer std.debug.print("vector {s}\n", .{name});
        var arena = std.heap.ArenaAllocator.init(gpa);
        defer arena.deinit();
        const a = arena.allocator();
        const text = try prefix.promptText(a, v.object.get("body").?);
        try testing.expectEqualStrings(v.object.get("text").?.string, text);
        const limit: usize = if (v.object.get("max_blocks")) |m| @intCast(m.integer) else prefix.max_blocks;
        const got = try prefix.hashes(a, text, limit);
        const want = v.object.get("hashes").?.array.items;
        try testing.expectEqual(want.len, got.len);
        for (want, got) |w, g| try testing.expectEqual(try std.fmt.parseInt(u64, w.string, 10), g);
        try testing.expectEqual(@as(u32, @intCast(v.object.get("estimated_tokens").?.integer)), prefix.estimateTokens(text));
    }
}
