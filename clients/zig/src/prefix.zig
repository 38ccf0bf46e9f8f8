//! Prefix hashes as docs/PREFIX_HASH.md defines them, for every gateway alike:
//! the prompt text of an OpenAI-compatible body, cut into 64-byte blocks, each
//! hashed with SHA-256 chained on the previous hash. Tested against
//! testdata/prefix_hash_vectors.json.
const std = @import("std");

const Allocator = std.mem.Allocator;
const Value = std.json.Value;
const Sha256 = std.crypto.hash.sha2.Sha256;

/// 64 bytes of text is about 16 tokens: one KV-cache block.
pub const block_bytes = 64;
/// The engine's default cache.max_blocks_per_request.
pub const max_blocks = 1024;

fn isTextPart(t: []const u8) bool {
    return std.mem.eql(u8, t, "text") or std.mem.eql(u8, t, "input_text") or std.mem.eql(u8, t, "output_text");
}

fn contentText(out: *std.ArrayList(u8), a: Allocator, content: ?Value) Allocator.Error!void {
    const v = content orelse return;
    switch (v) {
        .string => |s| try out.appendSlice(a, s),
        .array => |parts| for (parts.items) |part| {
            if (part != .object) continue;
            const t = part.object.get("type") orelse continue;
            const text = part.object.get("text") orelse continue;
            if (t == .string and isTextPart(t.string) and text == .string) try out.appendSlice(a, text.string);
        },
        else => {},
    }
}

fn messagesText(out: *std.ArrayList(u8), a: Allocator, messages: []const Value) Allocator.Error!void {
    for (messages) |m| {
        if (m != .object) continue;
        const role = m.object.get("role");
        if (role) |r| if (r == .string) try out.appendSlice(a, r.string);
        try out.appendSlice(a, ": ");
        try contentText(out, a, m.object.get("content"));
        try out.append(a, '\n');
    }
}

fn stringsText(out: *std.ArrayList(u8), a: Allocator, v: ?Value) Allocator.Error!void {
    const value = v orelse return;
    switch (value) {
        .string => |s| try out.appendSlice(a, s),
        .array => |items| {
            // Token-id arrays (or anything not all strings) carry no text to hash.
            for (items.items) |it| if (it != .string) return;
            for (items.items, 0..) |it, i| {
                if (i > 0) try out.append(a, '\n');
                try out.appendSlice(a, it.string);
            }
        },
        else => {},
    }
}

/// The canonical prompt text of a request body (docs/PREFIX_HASH.md section 1),
/// allocated from `a`. A body that is not a JSON object has no text.
pub fn promptText(a: Allocator, body: Value) Allocator.Error![]u8 {
    var out: std.ArrayList(u8) = .empty;
    if (body != .object) return out.toOwnedSlice(a);
    const obj = body.object;
    if (obj.get("messages")) |m| if (m == .array) {
        try messagesText(&out, a, m.array.items);
        return out.toOwnedSlice(a);
    };
    if (obj.get("prompt")) |p| {
        try stringsText(&out, a, p);
        return out.toOwnedSlice(a);
    }
    var has_head = false;
    if (obj.get("instructions")) |i| if (i == .string and i.string.len > 0) {
        try out.appendSlice(a, "system: ");
        try out.appendSlice(a, i.string);
        try out.append(a, '\n');
        has_head = true;
    };
    const input = obj.get("input");
    if (input) |v| if (v == .array) {
        for (v.array.items) |item| if (item == .object) {
            try messagesText(&out, a, v.array.items);
            return out.toOwnedSlice(a);
        };
    };
    if (has_head) {
        if (input) |v| if (v == .string) {
            try out.appendSlice(a, "user: ");
            try out.appendSlice(a, v.string);
            try out.append(a, '\n');
        };
        return out.toOwnedSlice(a);
    }
    try stringsText(&out, a, input);
    return out.toOwnedSlice(a);
}

/// Chained hashes of the full 64-byte blocks of `text`, at most `limit`:
/// h[i] = first 8 bytes, big-endian, of SHA-256(h[i-1] big-endian || block[i]), h[-1] = 0.
pub fn hashes(a: Allocator, text: []const u8, limit: usize) Allocator.Error![]u64 {
    const n = @min(text.len / block_bytes, limit);
    const out = try a.alloc(u64, n);
    var prev: [8]u8 = @splat(0);
    for (out, 0..) |*h, i| {
        var sha = Sha256.init(.{});
        sha.update(&prev);
        sha.update(text[i * block_bytes ..][0..block_bytes]);
        const digest = sha.finalResult();
        prev = digest[0..8].*;
        h.* = std.mem.readInt(u64, &prev, .big);
    }
    return out;
}

/// estimated_input_tokens when the gateway has no tokenizer: ceil(bytes / 4).
pub fn estimateTokens(text: []const u8) u32 {
    return @intCast(@min((text.len + 3) / 4, std.math.maxInt(u32)));
}
