// SPDX-License-Identifier: Apache-2.0

package main

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"regexp"
	"runtime"
	"strconv"
	"strings"
	"time"

	"gopkg.in/yaml.v3"
)

// Config is the daemon's configuration: defaults, then renderd.yaml (-c), then flags.
// Every key of renderd.yaml is a field here; unknown keys are rejected.
type Config struct {
	MapProxyConfig    string   `yaml:"mapproxy_config"`
	Socket            string   `yaml:"socket"`
	SocketMode        string   `yaml:"socket_mode"`
	SocketGroup       string   `yaml:"socket_group"`
	HTTP              *string  `yaml:"http"` // nil: from globals.renderd.address; "": no TCP listener
	AllowRemoteHTTP   bool     `yaml:"allow_remote_http"`
	Renderers         int      `yaml:"renderers"`
	MaxSeedRenderers  *int     `yaml:"max_seed_renderers"` // nil: same as renderers (no reservation)
	SeedPriorityBelow int      `yaml:"seed_priority_below"`
	RendererCommand   []string `yaml:"renderer_command"`
	RenderTimeout     Duration `yaml:"render_timeout"`
	StartTimeout      Duration `yaml:"start_timeout"`
	RecycleAfter      int      `yaml:"recycle_after"`
	MaxQueued         int      `yaml:"max_queued"`
	MaxLineBytes      int      `yaml:"max_line_bytes"`
	MaxConnections    int      `yaml:"max_connections"`
	MaxInFlight       int      `yaml:"max_in_flight_per_connection"`
	AllowedUIDs       []int    `yaml:"allowed_uids"`
	AllowedGIDs       []int    `yaml:"allowed_gids"`
	LogLevel          string   `yaml:"log_level"`
	LogFormat         string   `yaml:"log_format"`
	StopTimeout       Duration `yaml:"stop_timeout"`
	ClientTimeout     Duration `yaml:"client_timeout"` // a connection's first line; a POST body (plus 1 s per 64 KiB)

	// Tasks (docs/design.md §10): seeding and cleanup run by the daemon itself.
	SeedConfig          string            `yaml:"seed_config"`            // MapProxy's seed.yaml; -s overrides
	SeedConfigs         map[string]string `yaml:"seed_configs"`           // more seed.yaml files, by the name requests use
	MaxTasks            int               `yaml:"max_tasks"`              // tasks running at once; the rest wait queued
	SeedPriority        int               `yaml:"seed_priority"`          // default priority of a task's jobs
	SeedWindow          int               `yaml:"seed_window"`            // a task's jobs queued or running at once
	SeedRetries         int               `yaml:"seed_retries"`           // retries of a failed task job
	SeedRetryBackoff    Duration          `yaml:"seed_retry_backoff"`     // first retry delay, doubling
	SeedMaxFailureRatio float64           `yaml:"seed_max_failure_ratio"` // of the last 1,000 metatiles
	PlannerCommand      []string          `yaml:"planner_command"`        // default: the bundled worker's plan mode
	Schedules           []Schedule        `yaml:"schedules"`
	// BackgroundRate caps all non-live work of a cache, metatiles per second (docs/design.md §17).
	BackgroundRate map[string]float64 `yaml:"background_rate"`
	// Live helpers (live.go, prefetch.go, docs/design.md §13).
	SeedNice       int             `yaml:"seed_nice"`
	SeedIOPrioIdle bool            `yaml:"seed_ioprio_idle"`
	HTTPWait       Duration        `yaml:"http_wait"`
	Prefetch       *PrefetchConfig `yaml:"prefetch"`
	// Cluster is HAProxy's URL (examples/cluster): a task sends each metatile there, as
	// MapProxy would, so that its owner renders it (docs/design.md §15). "" = this daemon renders.
	Cluster string `yaml:"cluster"`

	// Journal (docs/design.md §12) and expiry lists (§11).
	StateDir  string `yaml:"state_dir"`  // where the journal lives
	Journal   bool   `yaml:"journal"`    // false: accepted background work does not survive a crash
	ExpireDir string `yaml:"expire_dir"` // spool directory of expiry lists; "" = none
	// How spooled lists propagate (the expire command's min_zoom, max_zoom, delete_from).
	ExpireMinZoom    int  `yaml:"expire_min_zoom"`
	ExpireMaxZoom    *int `yaml:"expire_max_zoom"`    // nil: each line's own zoom
	ExpireDeleteFrom *int `yaml:"expire_delete_from"` // nil: never delete
	// ExpireOnlyCached: expiry runs re-render only metatiles with a tile in the cache (nil:
	// true, as mod_tile's render_expired); false renders every metatile of a list. A run's
	// only_cached overrides it.
	ExpireOnlyCached *bool `yaml:"expire_only_cached"`

	// Derived by resolve; not part of the file.
	socketMode  os.FileMode
	httpAddr    string // "" = no TCP listener
	maxSeed     int
	mapproxyURL string // globals.renderd.address, for logs
	// stateDirSet says state_dir was given: an unusable one is then fatal, while the
	// default one, unusable (not root, no StateDirectory=), only turns the journal off.
	stateDirSet bool
}

// Schedule runs a named task of seed_config on a timer: every Every, or daily at At (local
// time, "HH:MM"), or daily at At and then every Every.
type Schedule struct {
	Task  string   `yaml:"task"`
	Every Duration `yaml:"every"`
	At    string   `yaml:"at"`
	Rate  float64  `yaml:"rate"` // metatiles per second; 0: unlimited (docs/design.md §17)
}

// Duration is a time.Duration written as "60s", "1m30s" or a number of seconds in YAML.
type Duration time.Duration

// UnmarshalYAML accepts Go duration strings and plain numbers of seconds.
func (d *Duration) UnmarshalYAML(n *yaml.Node) error {
	// A *yaml.TypeError with the line: keyedYAMLError then names the key.
	if n.Kind != yaml.ScalarNode {
		return &yaml.TypeError{Errors: []string{fmt.Sprintf("line %d: want a duration such as 60s", n.Line)}}
	}
	if secs, err := strconv.ParseFloat(n.Value, 64); err == nil {
		*d = Duration(secs * float64(time.Second))
		return nil
	}
	v, err := time.ParseDuration(n.Value)
	if err != nil {
		return &yaml.TypeError{Errors: []string{fmt.Sprintf("line %d: want a duration such as 60s, got %q", n.Line, n.Value)}}
	}
	*d = Duration(v)
	return nil
}

func (d Duration) String() string { return time.Duration(d).String() }

const (
	defaultSocket       = "/run/mapproxy-renderd.sock"
	defaultMaxLineBytes = 1 << 20
	defaultStateDir     = "/var/lib/mapproxy-renderd"
)

// defaultConfig returns the configuration used when no file says otherwise.
func defaultConfig() Config {
	return Config{
		Socket:            defaultSocket,
		SocketMode:        "0660",
		Renderers:         runtime.NumCPU(),
		SeedPriorityBelow: 50,
		RenderTimeout:     Duration(60 * time.Second),
		StartTimeout:      Duration(60 * time.Second),
		MaxQueued:         1_000_000,
		MaxLineBytes:      defaultMaxLineBytes,
		MaxConnections:    4096,
		MaxInFlight:       100_000,
		LogLevel:          "info",
		LogFormat:         "text",
		StateDir:          defaultStateDir,
		Journal:           true,
		StopTimeout:       Duration(60 * time.Second),
		ClientTimeout:     Duration(60 * time.Second),

		SeedPriority:        10,
		MaxTasks:            4,
		SeedWindow:          10_000,
		SeedRetries:         3,
		SeedRetryBackoff:    Duration(time.Second),
		SeedMaxFailureRatio: 0.1,
		SeedNice:            10,
		SeedIOPrioIdle:      true,
	}
}

// parseConfig reads renderd.yaml from r on top of c. Unknown keys are errors that name the key.
func parseConfig(c *Config, r io.Reader) error {
	data, err := io.ReadAll(r)
	if err != nil {
		return err
	}
	if len(bytes.TrimSpace(data)) == 0 {
		return nil
	}
	dec := yaml.NewDecoder(bytes.NewReader(data))
	dec.KnownFields(true)
	if err := dec.Decode(c); err != nil && !errors.Is(err, io.EOF) {
		return fmt.Errorf("renderd config: %w", keyedYAMLError(err, data))
	}
	return nil
}

// Validate checks every key and fills the derived fields. Errors name the key.
func (c *Config) Validate() error {
	if c.Journal && !filepath.IsAbs(c.StateDir) {
		return fmt.Errorf("state_dir: want an absolute path (or journal: false), got %q", c.StateDir)
	}
	if c.ExpireDir != "" && !filepath.IsAbs(c.ExpireDir) {
		return fmt.Errorf("expire_dir: want an absolute path, got %q", c.ExpireDir)
	}
	for _, z := range []struct {
		key string
		v   *int
	}{{"expire_max_zoom", c.ExpireMaxZoom}, {"expire_delete_from", c.ExpireDeleteFrom}} {
		if z.v != nil && (*z.v < 0 || *z.v > maxExpireZoom) {
			return fmt.Errorf("%s: want 0..%d, got %d", z.key, maxExpireZoom, *z.v)
		}
	}
	if err := c.spoolRange().validate(); err != nil {
		return fmt.Errorf("expire_%w", err)
	}
	if c.Renderers < 1 || c.Renderers > 1024 {
		return fmt.Errorf("renderers: want 1..1024, got %d", c.Renderers)
	}
	c.maxSeed = c.Renderers
	if c.MaxSeedRenderers != nil {
		if *c.MaxSeedRenderers < 0 || *c.MaxSeedRenderers > c.Renderers {
			return fmt.Errorf("max_seed_renderers: want 0..renderers (%d), got %d", c.Renderers, *c.MaxSeedRenderers)
		}
		c.maxSeed = *c.MaxSeedRenderers
	}
	if c.SeedPriorityBelow < 0 || c.SeedPriorityBelow > maxPriority+1 {
		return fmt.Errorf("seed_priority_below: want 0..%d, got %d", maxPriority+1, c.SeedPriorityBelow)
	}
	if c.RenderTimeout <= 0 {
		return fmt.Errorf("render_timeout: must be positive, got %s", c.RenderTimeout)
	}
	if c.StartTimeout <= 0 {
		return fmt.Errorf("start_timeout: must be positive, got %s", c.StartTimeout)
	}
	if c.StopTimeout < 0 {
		return fmt.Errorf("stop_timeout: must not be negative, got %s", c.StopTimeout)
	}
	if c.ClientTimeout < Duration(100*time.Millisecond) {
		return fmt.Errorf("client_timeout: want at least 100ms, got %s", c.ClientTimeout)
	}
	if c.RecycleAfter < 0 {
		return fmt.Errorf("recycle_after: must not be negative, got %d", c.RecycleAfter)
	}
	if c.MaxQueued < 1 {
		return fmt.Errorf("max_queued: must be at least 1, got %d", c.MaxQueued)
	}
	if c.MaxLineBytes < 1024 || c.MaxLineBytes > 64<<20 {
		return fmt.Errorf("max_line_bytes: want 1024..%d, got %d", 64<<20, c.MaxLineBytes)
	}
	if c.MaxConnections < 1 {
		return fmt.Errorf("max_connections: must be at least 1, got %d", c.MaxConnections)
	}
	if c.MaxInFlight < 1 {
		return fmt.Errorf("max_in_flight_per_connection: must be at least 1, got %d", c.MaxInFlight)
	}
	if _, err := parseLogLevel(c.LogLevel); err != nil {
		return fmt.Errorf("log_level: %w", err)
	}
	if c.LogFormat != "text" && c.LogFormat != "json" {
		return fmt.Errorf("log_format: want text or json, got %q", c.LogFormat)
	}
	mode, err := strconv.ParseUint(c.SocketMode, 8, 32)
	if err != nil || mode > 0o777 {
		return fmt.Errorf("socket_mode: want an octal mode such as \"0660\", got %q", c.SocketMode)
	}
	c.socketMode = os.FileMode(mode)
	if c.Socket != "" && strings.ContainsRune(c.Socket, 0) {
		return errors.New("socket: contains a NUL byte")
	}
	for i, a := range c.RendererCommand {
		if a == "" && i == 0 {
			return errors.New("renderer_command: the program (first element) is empty")
		}
	}
	if len(c.RendererCommand) == 0 && c.MapProxyConfig == "" {
		return errors.New("mapproxy_config: required (-f) when renderer_command is not set")
	}
	if err := c.validateTasks(); err != nil {
		return err
	}
	if err := c.validateLive(); err != nil {
		return err
	}
	if c.HTTP != nil {
		c.httpAddr = *c.HTTP
	}
	if c.httpAddr != "" {
		if err := checkTCPAddr(c.httpAddr, c.AllowRemoteHTTP); err != nil {
			return fmt.Errorf("http: %w", err)
		}
	}
	return nil
}

// spoolRange is how lists from expire_dir propagate.
func (c *Config) spoolRange() expireRange {
	r := expireRange{MinZoom: c.ExpireMinZoom, MaxZoom: -1, DeleteFrom: -1, RenderAll: c.ExpireOnlyCached != nil && !*c.ExpireOnlyCached}
	if c.ExpireMaxZoom != nil {
		r.MaxZoom = *c.ExpireMaxZoom
		if r.MaxZoom < 0 {
			r.MaxZoom = maxExpireZoom + 1 // rejected by validate: a negative zoom is a mistake here
		}
	}
	if c.ExpireDeleteFrom != nil {
		r.DeleteFrom = *c.ExpireDeleteFrom
		if r.DeleteFrom < 0 {
			r.DeleteFrom = maxExpireZoom + 1
		}
	}
	return r
}

// checkTCPAddr accepts host:port; the host must be a loopback address unless remote is allowed.
func checkTCPAddr(addr string, allowRemote bool) error {
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return fmt.Errorf("want host:port, got %q", addr)
	}
	if _, err := strconv.ParseUint(port, 10, 16); err != nil {
		return fmt.Errorf("bad port in %q", addr)
	}
	if allowRemote {
		return nil
	}
	if host == "localhost" {
		return nil
	}
	ip := net.ParseIP(host)
	if ip == nil || !ip.IsLoopback() {
		return fmt.Errorf("%q is not a loopback address (set allow_remote_http: true to listen elsewhere)", addr)
	}
	return nil
}

// applyMapProxyConfig takes what the daemon needs from mapproxy.yaml: globals.renderd.address
// decides where MapProxy will POST, so it is where we listen unless renderd.yaml says otherwise.
func (c *Config) applyMapProxyConfig(socketSet bool) error {
	if c.MapProxyConfig == "" {
		return nil
	}
	data, err := readRegular(c.MapProxyConfig, maxConfigFileBytes)
	if err != nil {
		return fmt.Errorf("mapproxy_config: %w", err)
	}
	var doc struct {
		Globals struct {
			Renderd struct {
				Address string `yaml:"address"`
			} `yaml:"renderd"`
		} `yaml:"globals"`
	}
	if err := yaml.Unmarshal(data, &doc); err != nil {
		return fmt.Errorf("mapproxy_config %s: %w", c.MapProxyConfig, err)
	}
	addr := doc.Globals.Renderd.Address
	if addr == "" {
		return nil
	}
	c.mapproxyURL = addr
	network, where, err := parseRenderdAddress(addr)
	if err != nil {
		return fmt.Errorf("mapproxy_config %s: globals.renderd.address: %w", c.MapProxyConfig, err)
	}
	switch network {
	case "tcp":
		if c.HTTP == nil {
			c.httpAddr = where
		}
	case "unix":
		if !socketSet {
			c.Socket = where
		}
	}
	return nil
}

// parseRenderdAddress understands the two forms MapProxy 1.15 can POST to:
// http://host:port/path (TCP) and http+unix://<percent-encoded socket path>/ (Unix socket).
func parseRenderdAddress(addr string) (network, where string, err error) {
	if rest, ok := strings.CutPrefix(addr, "http+unix://"); ok {
		// requests-unixsocket puts the percent-encoded socket path where the host goes,
		// which net/url refuses to parse.
		host, _, _ := strings.Cut(rest, "/")
		p, err := url.PathUnescape(host)
		if err != nil || !strings.HasPrefix(p, "/") {
			return "", "", fmt.Errorf("want http+unix://%%2Fpath%%2Fto.sock/, got %q", addr)
		}
		return "unix", p, nil
	}
	u, err := url.Parse(addr)
	if err != nil {
		return "", "", err
	}
	switch u.Scheme {
	case "http":
		host := u.Host
		if u.Port() == "" {
			host = net.JoinHostPort(u.Hostname(), "80")
		}
		return "tcp", host, nil
	default:
		return "", "", fmt.Errorf("unsupported scheme %q (want http:// or http+unix://)", u.Scheme)
	}
}

// loadConfig builds the configuration from the -f, -c and override flags: defaults, then
// renderd.yaml, then the flags; globals.renderd.address fills in a listener that neither set.
func loadConfig(f configFlags) (Config, error) {
	mapproxyPath, renderdPath, renderers, maxSeed, seedPath := f.mapproxy, f.renderd, f.renderers, f.maxSeed, f.seed
	c := defaultConfig()
	socketSet := false
	if renderdPath != "" {
		data, err := readRegular(renderdPath, maxConfigFileBytes)
		if err != nil {
			return c, err
		}
		if err := parseConfig(&c, bytes.NewReader(data)); err != nil {
			return c, fmt.Errorf("%s: %w", renderdPath, err)
		}
		var keys map[string]any
		if yaml.Unmarshal(data, &keys) == nil {
			_, socketSet = keys["socket"]
			_, c.stateDirSet = keys["state_dir"]
		}
	}
	if mapproxyPath != "" {
		c.MapProxyConfig = mapproxyPath
	}
	if renderers > 0 {
		c.Renderers = renderers
	}
	if seedPath != "" {
		c.SeedConfig = seedPath
	}
	if c.SeedConfig != "" {
		// The planner runs with another working directory's view of relative paths.
		if abs, err := filepath.Abs(c.SeedConfig); err == nil {
			c.SeedConfig = abs
		}
	}
	for name, p := range c.SeedConfigs {
		if abs, err := filepath.Abs(p); err == nil && p != "" {
			c.SeedConfigs[name] = abs
		}
	}
	if maxSeed >= 0 {
		c.MaxSeedRenderers = &maxSeed
	}
	if f.socket != nil {
		c.Socket, socketSet = *f.socket, true
	}
	if f.http != nil {
		h := *f.http
		c.HTTP = &h
	}
	if err := c.applyMapProxyConfig(socketSet); err != nil {
		return c, err
	}
	if err := c.Validate(); err != nil {
		// Name where the bad value came from: a flag, else renderd.yaml.
		for _, o := range []struct {
			given     bool
			key, flag string
		}{
			{f.socket != nil, "socket", "--socket"}, {f.http != nil, "http", "--http"},
			{renderers > 0, "renderers", "--renderer"}, {maxSeed >= 0, "max_seed_renderers", "--max-seed-renderer"},
		} {
			if o.given && strings.HasPrefix(err.Error(), o.key+":") {
				return c, fmt.Errorf("%s (overrides %s): %w", o.flag, o.key, err)
			}
		}
		if renderdPath != "" {
			return c, fmt.Errorf("%s: %w", renderdPath, err)
		}
		return c, err
	}
	return c, nil
}

// validateTasks checks the task keys (docs/design.md §10). The names in schedules are checked against
// seed_config by checkSeedNames, which reads that file.
func (c *Config) validateTasks() error {
	if c.SeedPriority < minPriority || c.SeedPriority > maxPriority {
		return fmt.Errorf("seed_priority: want %d..%d, got %d", minPriority, maxPriority, c.SeedPriority)
	}
	if c.SeedWindow < 1 || c.SeedWindow > 10_000_000 {
		return fmt.Errorf("seed_window: want 1..10000000, got %d", c.SeedWindow)
	}
	if c.SeedRetries < 0 || c.SeedRetries > 100 {
		return fmt.Errorf("seed_retries: want 0..100, got %d", c.SeedRetries)
	}
	if c.SeedRetryBackoff < 0 {
		return fmt.Errorf("seed_retry_backoff: must not be negative, got %s", c.SeedRetryBackoff)
	}
	for cache, r := range c.BackgroundRate {
		if err := checkRate(r, false); err != nil {
			return fmt.Errorf("background_rate.%s: %w", cache, err)
		}
	}
	if c.SeedMaxFailureRatio < 0 || c.SeedMaxFailureRatio > 1 {
		return fmt.Errorf("seed_max_failure_ratio: want 0..1, got %g", c.SeedMaxFailureRatio)
	}
	if len(c.PlannerCommand) > 0 && c.PlannerCommand[0] == "" {
		return errors.New("planner_command: the program (first element) is empty")
	}
	if len(c.PlannerCommand) == 0 && len(c.RendererCommand) > 0 && c.MapProxyConfig == "" && c.SeedConfig != "" {
		return errors.New("planner_command: required for seed_config when there is no mapproxy_config")
	}
	if c.Cluster != "" {
		u, err := url.Parse(c.Cluster)
		if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" || u.User != nil || u.Fragment != "" {
			return fmt.Errorf("cluster: want HAProxy's address as an http:// (or https://) URL, e.g. http://127.0.0.1:8111/, got %q", c.Cluster)
		}
	}
	if c.MaxTasks < 1 || c.MaxTasks > 1000 {
		return fmt.Errorf("max_tasks: want 1..1000, got %d", c.MaxTasks)
	}
	for name, p := range c.SeedConfigs {
		if !seedConfigName.MatchString(name) {
			return fmt.Errorf("seed_configs: name %q: want letters, digits, '_', '-' or '.' (at most 64), not a path", name)
		}
		if p == "" {
			return fmt.Errorf("seed_configs.%s: want the path of a seed.yaml", name)
		}
	}
	if len(c.Schedules) > 0 && c.SeedConfig == "" {
		return errors.New("schedules: need seed_config (or -s seed.yaml)")
	}
	for i, s := range c.Schedules {
		if s.Task == "" {
			return fmt.Errorf("schedules[%d].task: required", i)
		}
		if err := checkRate(s.Rate, true); err != nil {
			return fmt.Errorf("schedules[%d].rate: %w", i, err)
		}
		if s.Every < 0 || (s.Every > 0 && s.Every < Duration(time.Second)) {
			return fmt.Errorf("schedules[%d].every: want at least 1s, got %s", i, s.Every)
		}
		if s.At != "" {
			if _, _, err := parseClock(s.At); err != nil {
				return fmt.Errorf("schedules[%d].at: %w", i, err)
			}
		}
		if s.Every == 0 && s.At == "" {
			return fmt.Errorf("schedules[%d]: set every, at, or both", i)
		}
	}
	return nil
}

// seedConfigName is what a seed_configs name may be: requests send it, so it must not
// look like a path.
var seedConfigName = regexp.MustCompile(`^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$`)

// parseClock parses "HH:MM" (24-hour local time).
func parseClock(s string) (hour, minute int, err error) {
	t, err := time.Parse("15:04", s)
	if err != nil {
		return 0, 0, fmt.Errorf("want a time of day such as \"03:00\", got %q", s)
	}
	return t.Hour(), t.Minute(), nil
}

// maxRate bounds a rate (metatiles per second): beyond it a limit means nothing.
const maxRate = 1e6

// checkRate checks a rate in metatiles per second: positive, or 0 (absent) where zeroOK.
func checkRate(r float64, zeroOK bool) error {
	if (r == 0 && zeroOK) || (r > 0 && r <= maxRate) {
		return nil
	}
	return fmt.Errorf("want a positive number of metatiles per second up to %g, got %g", float64(maxRate), r)
}
