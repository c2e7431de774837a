package main

import (
	"context"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"
)

// TestDebianPackageDeployment runs packaging/deploy-test/run.sh: README's section
// "Production on Debian 12 or 13", followed to the letter on bookworm and trixie booted
// with systemd-nspawn (see the script). It needs root, debootstrap and systemd-nspawn; it
// is skipped without them and fails under CI=true. DEPLOY_TEST_SUITES narrows the suites
// (e.g. "trixie"). Its name starts with TestDebianPackage so that `-skip TestDebianPackage`
// leaves out everything that installs system-wide.
func TestDebianPackageDeployment(t *testing.T) {
	var missing []string
	for _, tool := range []string{"debootstrap", "systemd-nspawn", "dpkg-deb", "git"} {
		if _, err := exec.LookPath(tool); err != nil {
			missing = append(missing, tool)
		}
	}
	msg := ""
	switch {
	case len(missing) > 0:
		msg = "missing " + strings.Join(missing, ", ") + " (apt-get install debootstrap systemd-container)"
	case os.Getuid() != 0:
		msg = "the deployment test needs root (debootstrap, systemd-nspawn)"
	case testing.Short():
		msg = "-short: the deployment test boots two Debian containers"
	}
	if msg != "" {
		if os.Getenv("CI") == "true" {
			t.Fatal(msg)
		}
		t.Skip(msg)
	}
	ctx, cancel := context.WithTimeout(t.Context(), 75*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "packaging/deploy-test/run.sh", strings.Fields(os.Getenv("DEPLOY_TEST_SUITES"))...)
	cmd.WaitDelay = time.Minute
	out, err := cmd.CombinedOutput()
	t.Logf("packaging/deploy-test/run.sh:\n%s", out)
	if err != nil {
		t.Fatalf("deployment test: %v", err)
	}
}
