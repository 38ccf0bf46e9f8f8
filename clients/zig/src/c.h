/* The C surface the Zig client sits on: gRPC's C core (completion-queue API,
 * SSL credentials) and the protobuf-c messages generated into gen/. */
#include <grpc/grpc.h>
#include <grpc/grpc_security.h>
#include <grpc/byte_buffer_reader.h>
#include <grpc/slice.h>
#include <grpc/support/time.h>

#include "decider/v1/decider_service.pb-c.h"
#include "decider/v1/registry_service.pb-c.h"
#include "decider/zig/rpc_details.pb-c.h"
