//! A gateway outside this package depending on `decider` exactly as docs/CLIENTS.md shows:
//! one dependency in build.zig.zon, one import here. `make test-zig` builds it.
const std = @import("std");

pub fn build(b: *std.Build) void {
    const target = b.standardTargetOptions(.{});
    const optimize = b.standardOptimizeOption(.{});
    const exe = b.addExecutable(.{
        .name = "consumer",
        .root_module = b.createModule(.{
            .root_source_file = b.path("main.zig"),
            .target = target,
            .optimize = optimize,
        }),
    });
    exe.root_module.addImport("decider", b.dependency("decider", .{ .target = target, .optimize = optimize }).module("decider"));
    b.installArtifact(exe);
    const run = b.addRunArtifact(exe);
    b.step("run", "Build and run the consumer").dependOn(&run.step);
}
