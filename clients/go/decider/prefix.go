package decider

import (
	"crypto/sha256"
	"encoding/binary"
	"encoding/json"
	"errors"
	"strings"
)

// The shared prefix-hash definition (docs/PREFIX_HASH.md), as decider.core.prefix
// computes it in Python; testdata/prefix_hash_vectors.json holds the vectors both
// are tested against.
const (
	// PrefixBlockBytes is the block size: 64 bytes of text, about 16 tokens.
	PrefixBlockBytes = 64
	// MaxPrefixBlocks is how many hashes a request sends at most (64 KiB of prompt).
	MaxPrefixBlocks = 1024
	bytesPerToken   = 4
)

// PromptText returns the canonical prompt text of an OpenAI-compatible JSON
// request body, by the first field present: messages (chat completions),
// prompt (completions), instructions and/or input (responses), input
// (embeddings). Each message is role + ": " + text + "\n"; the text parts of an
// array content are concatenated; anything that is not text adds nothing. It
// fails only when the body is not a JSON object.
func PromptText(body []byte) (string, error) {
	var fields map[string]any
	if err := json.Unmarshal(body, &fields); err != nil {
		return "", err
	}
	if fields == nil {
		return "", errors.New("body is not a JSON object")
	}
	if messages, ok := fields["messages"].([]any); ok {
		return messagesText(messages), nil
	}
	if prompt, ok := fields["prompt"]; ok {
		return stringsText(prompt), nil
	}
	head := ""
	if instructions, ok := fields["instructions"].(string); ok && instructions != "" {
		head = "system: " + instructions + "\n"
	}
	input := fields["input"]
	if list, ok := input.([]any); ok && hasObject(list) {
		return head + messagesText(list), nil
	}
	if head != "" {
		if s, ok := input.(string); ok {
			return head + "user: " + s + "\n", nil
		}
		return head, nil
	}
	return stringsText(input), nil
}

// PrefixHashes returns the chained hashes of the text's full 64-byte blocks, at
// most maxBlocks of them (MaxPrefixBlocks when maxBlocks <= 0): h[i] is the
// first 8 bytes, big-endian, of SHA-256(h[i-1] as 8 bytes big-endian || block i),
// with h[-1] = 0. Two prompts sharing their first k blocks share their first k
// hashes. A last partial block is not hashed.
func PrefixHashes(text string, maxBlocks int) []uint64 {
	if maxBlocks <= 0 {
		maxBlocks = MaxPrefixBlocks
	}
	n := min(len(text)/PrefixBlockBytes, maxBlocks)
	out := make([]uint64, 0, n)
	buf := make([]byte, 8+PrefixBlockBytes)
	for i := range n {
		copy(buf[8:], text[i*PrefixBlockBytes:(i+1)*PrefixBlockBytes])
		sum := sha256.Sum256(buf)
		copy(buf[:8], sum[:8])
		out = append(out, binary.BigEndian.Uint64(sum[:8]))
	}
	return out
}

// EstimateTokens is the input-token estimate for a gateway with no tokenizer:
// ceil(UTF-8 bytes of the prompt text / 4).
func EstimateTokens(text string) uint32 {
	return uint32(min((len(text)+bytesPerToken-1)/bytesPerToken, 1<<31))
}

func messagesText(messages []any) string {
	var b strings.Builder
	for _, m := range messages {
		message, ok := m.(map[string]any)
		if !ok {
			continue
		}
		role, _ := message["role"].(string)
		b.WriteString(role)
		b.WriteString(": ")
		b.WriteString(contentText(message["content"]))
		b.WriteByte('\n')
	}
	return b.String()
}

func contentText(content any) string {
	switch c := content.(type) {
	case string:
		return c
	case []any:
		var b strings.Builder
		for _, p := range c {
			part, ok := p.(map[string]any)
			if !ok {
				continue
			}
			kind, _ := part["type"].(string)
			text, isText := part["text"].(string)
			if isText && (kind == "text" || kind == "input_text" || kind == "output_text") {
				b.WriteString(text)
			}
		}
		return b.String()
	}
	return ""
}

// stringsText is a string itself, a list of strings joined with "\n", and
// nothing for anything else (token-id arrays carry no text to hash).
func stringsText(value any) string {
	switch v := value.(type) {
	case string:
		return v
	case []any:
		parts := make([]string, 0, len(v))
		for _, item := range v {
			s, ok := item.(string)
			if !ok {
				return ""
			}
			parts = append(parts, s)
		}
		return strings.Join(parts, "\n")
	}
	return ""
}

func hasObject(list []any) bool {
	for _, item := range list {
		if _, ok := item.(map[string]any); ok {
			return true
		}
	}
	return false
}
