// Command decider-load drives Decide (and, with -outcomes, ReportOutcome for every decision) at
// full speed against one Decider for a fixed time, and prints a JSON summary. It is the load
// generator of `make soak` (bench/soak.py), which samples the server's memory meanwhile: ghz
// cannot report the outcome of the decision it was just given.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"sort"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/protobuf/types/known/durationpb"

	pb "github.com/decider-dev/decider/clients/go/gen/decider/v1"
)

type summary struct {
	Decisions int64   `json:"decisions"`
	Outcomes  int64   `json:"outcomes"`
	Errors    int64   `json:"errors"`
	Seconds   float64 `json:"seconds"`
	PerSecond float64 `json:"decisions_per_s"`
	P50Ms     float64 `json:"decide_p50_ms"`
	P99Ms     float64 `json:"decide_p99_ms"`
	FirstErr  string  `json:"first_error,omitempty"`
}

func main() {
	target := flag.String("target", "127.0.0.1:50051", "decider address")
	model := flag.String("model", "m", "model to ask for")
	duration := flag.Duration("duration", time.Minute, "how long to run")
	concurrency := flag.Int("concurrency", 32, "calls in flight")
	connections := flag.Int("connections", 4, "HTTP/2 connections")
	outcomes := flag.Bool("outcomes", false, "report an outcome for every decision")
	sessions := flag.Int("sessions", 0, "session ids cycle over this many (0: none, -1: a new one per request)")
	tenants := flag.Int("tenants", 0, "tenant names cycle over this many (0: none, -1: a new one per request)")
	prefix := flag.Int("prefix-blocks", 8, "prefix hashes per request (16 shared prompts)")
	flag.Parse()

	conns := make([]pb.DeciderServiceClient, *connections)
	for i := range conns {
		conn, err := grpc.NewClient(*target, grpc.WithTransportCredentials(insecure.NewCredentials()))
		if err != nil {
			fmt.Fprintln(os.Stderr, "decider-load:", err)
			os.Exit(1)
		}
		defer conn.Close()
		conns[i] = pb.NewDeciderServiceClient(conn)
	}

	var seq, decisions, reported, errs atomic.Int64
	var firstErr atomic.Value
	fail := func(err error) {
		errs.Add(1)
		firstErr.CompareAndSwap(nil, err.Error())
	}
	ctx, cancel := context.WithTimeout(context.Background(), *duration)
	defer cancel()
	latencies := make([][]float64, *concurrency)
	var wg sync.WaitGroup
	start := time.Now()
	for w := 0; w < *concurrency; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			api := conns[w%len(conns)]
			for ctx.Err() == nil {
				n := seq.Add(1)
				req := &pb.DecideRequest{Model: *model, PrefixHashes: hashes(n, *prefix)}
				req.SessionId = name("s", n, *sessions)
				req.Tenant = name("t", n, *tenants)
				began := time.Now()
				resp, err := api.Decide(ctx, req)
				if err != nil {
					if ctx.Err() == nil {
						fail(err)
					}
					continue
				}
				latencies[w] = append(latencies[w], float64(time.Since(began).Microseconds())/1000)
				decisions.Add(1)
				if !*outcomes {
					continue
				}
				_, err = api.ReportOutcome(ctx, &pb.ReportOutcomeRequest{
					DecisionId:   resp.DecisionId,
					EndpointId:   resp.Endpoint.GetId(),
					Result:       pb.Result_RESULT_SUCCESS,
					Latency:      durationpb.New(200 * time.Millisecond),
					InputTokens:  uint32(100 + n%50),
					OutputTokens: uint32(20 + n%30),
				})
				if err != nil {
					if ctx.Err() == nil {
						fail(err)
					}
					continue
				}
				reported.Add(1)
			}
		}(w)
	}
	wg.Wait()
	elapsed := time.Since(start).Seconds()
	var all []float64
	for _, l := range latencies {
		all = append(all, l...)
	}
	sort.Float64s(all)
	out := summary{
		Decisions: decisions.Load(),
		Outcomes:  reported.Load(),
		Errors:    errs.Load(),
		Seconds:   elapsed,
		PerSecond: float64(decisions.Load()) / elapsed,
		P50Ms:     quantile(all, 0.50),
		P99Ms:     quantile(all, 0.99),
	}
	if v, ok := firstErr.Load().(string); ok {
		out.FirstErr = v
	}
	_ = json.NewEncoder(os.Stdout).Encode(out)
}

// name is "" (count 0), a name cycling over count, or a new one per request (count -1).
func name(prefix string, n int64, count int) string {
	switch {
	case count == 0:
		return ""
	case count < 0:
		return prefix + strconv.FormatInt(n, 36)
	default:
		return prefix + strconv.FormatInt(n%int64(count), 36)
	}
}

// hashes are chained prefix hashes of one of 16 shared prompts plus one block of its own.
func hashes(n int64, blocks int) []uint64 {
	if blocks == 0 {
		return nil
	}
	out := make([]uint64, blocks)
	h := uint64(n%16) + 1
	for i := 0; i < blocks-1; i++ {
		h = h*0x9E3779B97F4A7C15 + uint64(i+1)
		out[i] = h
	}
	out[blocks-1] = uint64(n)*0xC2B2AE3D27D4EB4F + 7
	return out
}

func quantile(sorted []float64, q float64) float64 {
	if len(sorted) == 0 {
		return 0
	}
	return sorted[int(q*float64(len(sorted)-1))]
}
