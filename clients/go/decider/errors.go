package decider

import (
	"errors"
	"time"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"
)

// ErrorInfo reasons Decider sets on its statuses (README, "Status codes").
const (
	// UNAVAILABLE: Decider is up but no endpoint is usable for the request.
	ReasonNoHealthyEndpoint = "NO_HEALTHY_ENDPOINT"
	// UNAVAILABLE: the server is draining after SIGTERM.
	ReasonShuttingDown = "SHUTTING_DOWN"
	// RESOURCE_EXHAUSTED: the server is at max_concurrent_rpcs.
	ReasonServerOverloaded = "SERVER_OVERLOADED"
)

// Unreachable reports whether err means Decider itself could not answer (the
// connection failed, the deadline passed, the server is draining or overloaded)
// as opposed to Decider answering with a refusal about the request.
//
// Transport failures carry no ErrorInfo; Decider's own UNAVAILABLE says why in
// one, and only NO_HEALTHY_ENDPOINT is an answer about the endpoints.
func Unreachable(err error) bool {
	if err == nil {
		return false
	}
	st, ok := status.FromError(err)
	if !ok {
		return true
	}
	info := errorInfo(st)
	switch st.Code() {
	case codes.Unavailable:
		return info == nil || info.GetReason() != ReasonNoHealthyEndpoint
	case codes.ResourceExhausted:
		// A tenant over quota is an answer; a server out of capacity is not.
		return info != nil && info.GetReason() == ReasonServerOverloaded
	case codes.DeadlineExceeded, codes.Canceled, codes.Unknown, codes.Internal:
		// Canceled here comes from the transport (the caller's own cancellation is
		// checked before this is consulted); Unknown and Internal come from a
		// broken proxy or connection in front of Decider, not from Decider.
		return true
	}
	return false
}

// NoHealthyEndpoint reports whether Decider answered that no endpoint is usable.
func NoHealthyEndpoint(err error) bool {
	st, ok := status.FromError(unwrapStatus(err))
	if !ok || st.Code() != codes.Unavailable {
		return false
	}
	info := errorInfo(st)
	return info != nil && info.GetReason() == ReasonNoHealthyEndpoint
}

// RetryAfter returns the RetryInfo delay Decider attached to err (set on
// RESOURCE_EXHAUSTED when a tenant is over quota), or 0.
func RetryAfter(err error) time.Duration {
	st, ok := status.FromError(unwrapStatus(err))
	if !ok {
		return 0
	}
	for _, d := range st.Details() {
		if ri, ok := d.(*errdetails.RetryInfo); ok {
			return ri.GetRetryDelay().AsDuration()
		}
	}
	return 0
}

func errorInfo(st *status.Status) *errdetails.ErrorInfo {
	for _, d := range st.Details() {
		if info, ok := d.(*errdetails.ErrorInfo); ok {
			return info
		}
	}
	return nil
}

// unwrapStatus finds the gRPC status error inside wrapped errors.
func unwrapStatus(err error) error {
	for e := err; e != nil; e = errors.Unwrap(e) {
		if _, ok := e.(interface{ GRPCStatus() *status.Status }); ok {
			return e
		}
	}
	return err
}

func statusMessage(err error) string {
	if st, ok := status.FromError(err); ok {
		return st.Code().String() + ": " + st.Message()
	}
	return err.Error()
}

func durationProto(d time.Duration) *durationpb.Duration {
	if d <= 0 {
		return nil
	}
	return durationpb.New(d)
}
