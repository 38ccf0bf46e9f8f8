// Command goclient makes sequential Decide calls with the Go client
// (clients/go/decider), for bench/grpc/bench_clients.py. It prints one JSON
// line: per-call latency (mean, p50, p99) and the process's CPU per call (user
// + system, every goroutine and thread) over the measured calls.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"slices"
	"syscall"
	"time"

	"github.com/decider-dev/decider/clients/go/decider"
	pb "github.com/decider-dev/decider/clients/go/gen/decider/v1"
)

func cpu() time.Duration {
	var ru syscall.Rusage
	_ = syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

func main() {
	target := flag.String("target", "127.0.0.1:50051", "Decider address")
	model := flag.String("model", "m", "model to ask for")
	mode := flag.String("mode", "unary", "unary or stream")
	calls := flag.Int("calls", 3000, "measured calls")
	warmup := flag.Int("warmup", 300, "calls before measuring")
	flag.Parse()

	client, err := decider.Dial(*target, decider.Options{DecideTimeout: 5 * time.Second, Stream: *mode == "stream"})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	defer client.Close()
	ctx := context.Background()
	req := &pb.DecideRequest{Model: *model, SessionId: "bench", PrefixHashes: []uint64{1, 2, 3, 4}}
	for range *warmup {
		if _, err := client.Decide(ctx, req); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
	}
	lat := make([]time.Duration, *calls)
	cpu0, wall0 := cpu(), time.Now()
	for i := range lat {
		t0 := time.Now()
		if _, err := client.Decide(ctx, req); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		lat[i] = time.Since(t0)
	}
	wall, used := time.Since(wall0), cpu()-cpu0
	slices.Sort(lat)
	var sum time.Duration
	for _, l := range lat {
		sum += l
	}
	us := func(d time.Duration) float64 { return float64(d.Nanoseconds()) / 1e3 }
	_ = json.NewEncoder(os.Stdout).Encode(map[string]any{
		"client": "go", "mode": *mode, "calls": *calls, "wall_s": wall.Seconds(),
		"mean_us": us(sum / time.Duration(*calls)), "p50_us": us(lat[*calls/2]), "p99_us": us(lat[*calls*99/100]),
		"cpu_us_per_call": us(used / time.Duration(*calls)),
	})
}
