//! Asks a Decider that is not there, with fail-open and a seed endpoint: the
//! smallest program that uses the package end to end without a server.
const std = @import("std");
const decider = @import("decider");

pub fn main(init: std.process.Init) !void {
    const client = try decider.Client.init(init.gpa, init.io, "127.0.0.1:1", .{
        .fail_open = true,
        .seed_endpoints = &.{.{ .id = "local", .address = "127.0.0.1:8000", .model = "m" }},
    });
    defer client.deinit();
    var d = try client.decide(.{ .model = "m" }, null);
    defer d.deinit();
    if (!d.fail_open or !std.mem.eql(u8, d.endpoint.id, "local")) return error.UnexpectedDecision;
}
