package decider

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strconv"
	"testing"
)

type prefixVector struct {
	Name            string          `json:"name"`
	Body            json.RawMessage `json:"body"`
	MaxBlocks       int             `json:"max_blocks"`
	Text            string          `json:"text"`
	EstimatedTokens uint32          `json:"estimated_tokens"`
	Hashes          []string        `json:"hashes"`
}

func loadPrefixVectors(t *testing.T) []prefixVector {
	t.Helper()
	raw, err := os.ReadFile(filepath.Join("..", "..", "..", "testdata", "prefix_hash_vectors.json"))
	if err != nil {
		t.Fatal(err)
	}
	var file struct {
		BlockBytes int            `json:"block_bytes"`
		MaxBlocks  int            `json:"default_max_blocks"`
		Vectors    []prefixVector `json:"vectors"`
	}
	if err := json.Unmarshal(raw, &file); err != nil {
		t.Fatal(err)
	}
	if file.BlockBytes != PrefixBlockBytes || file.MaxBlocks != MaxPrefixBlocks {
		t.Fatalf("vectors use %d-byte blocks and %d hashes, the code %d and %d",
			file.BlockBytes, file.MaxBlocks, PrefixBlockBytes, MaxPrefixBlocks)
	}
	if len(file.Vectors) == 0 {
		t.Fatal("no vectors")
	}
	return file.Vectors
}

func TestPrefixHashVectors(t *testing.T) {
	for _, v := range loadPrefixVectors(t) {
		t.Run(v.Name, func(t *testing.T) {
			text, err := PromptText(v.Body)
			if err != nil {
				t.Fatal(err)
			}
			if text != v.Text {
				t.Fatalf("text %q, want %q", text, v.Text)
			}
			if got := EstimateTokens(text); got != v.EstimatedTokens {
				t.Errorf("estimated tokens %d, want %d", got, v.EstimatedTokens)
			}
			hashes := PrefixHashes(text, v.MaxBlocks)
			if len(hashes) != len(v.Hashes) {
				t.Fatalf("%d hashes, want %d", len(hashes), len(v.Hashes))
			}
			for i, want := range v.Hashes {
				if got := strconv.FormatUint(hashes[i], 10); got != want {
					t.Errorf("hash %d: %s, want %s", i, got, want)
				}
			}
		})
	}
}

func TestPromptTextRefusesWhatIsNotAnObject(t *testing.T) {
	for _, body := range []string{``, `[1, 2]`, `null`, `"text"`, `{"messages": [`} {
		if _, err := PromptText([]byte(body)); err == nil {
			t.Errorf("%q: no error", body)
		}
	}
}

func TestPrefixHashesShareTheirFirstBlocksAndNoMore(t *testing.T) {
	shared := string(make([]byte, 3*PrefixBlockBytes))
	x := PrefixHashes(shared+"the end of one prompt, long enough for one more block of its own!!", 0)
	y := PrefixHashes(shared+"the end of another prompt, long enough for one more block too....", 0)
	if len(x) != 4 || len(y) != 4 {
		t.Fatalf("len %d and %d, want 4", len(x), len(y))
	}
	for i := range 3 {
		if x[i] != y[i] {
			t.Fatalf("block %d differs", i)
		}
	}
	if x[3] == y[3] {
		t.Fatal("the last block is the same")
	}
	if got := PrefixHashes(shared, 2); len(got) != 2 || got[1] != x[1] {
		t.Fatalf("max 2: %v", got)
	}
}
