package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"sync"
	"syscall"
	"time"
)

// child is a process this program started. stop ends it; every child is stopped before
// the scenario that started it returns.
type child struct {
	name string
	cmd  *exec.Cmd
	done chan struct{}
	err  error // valid after done
}

// startChild starts a command in its own process group. Its standard error goes to
// logFile; lines of its standard output go to onLine, if set.
func startChild(name string, cmd *exec.Cmd, logFile string, onLine func(string)) (*child, error) {
	f, err := os.Create(logFile)
	if err != nil {
		return nil, err
	}
	cmd.Stderr = f
	var out io.ReadCloser
	if onLine != nil {
		if out, err = cmd.StdoutPipe(); err != nil {
			f.Close()
			return nil, err
		}
	} else {
		cmd.Stdout = f
	}
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		f.Close()
		return nil, fmt.Errorf("starting %s: %w", name, err)
	}
	c := &child{name: name, cmd: cmd, done: make(chan struct{})}
	var lines sync.WaitGroup
	if out != nil {
		lines.Add(1)
		go func() {
			defer lines.Done()
			sc := bufio.NewScanner(out)
			for sc.Scan() {
				onLine(sc.Text())
			}
			io.Copy(io.Discard, out)
		}()
	}
	go func() {
		lines.Wait() // Wait closes the pipe: read it to the end first
		c.err = cmd.Wait()
		f.Close()
		close(c.done)
	}()
	return c, nil
}

func (c *child) pid() int { return c.cmd.Process.Pid }

func (c *child) exited() bool {
	select {
	case <-c.done:
		return true
	default:
		return false
	}
}

// stop sends SIGTERM, and SIGKILL to the process group after grace.
func (c *child) stop(grace time.Duration) {
	if c.exited() {
		return
	}
	c.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-c.done:
	case <-time.After(grace):
		syscall.Kill(-c.pid(), syscall.SIGKILL)
		<-c.done
	}
}

// waitPort waits until something accepts connections on addr, or the child exits.
func waitPort(ctx context.Context, addr string, c *child) error {
	for {
		if conn, err := net.DialTimeout("tcp", addr, time.Second); err == nil {
			conn.Close()
			return nil
		}
		if c.exited() {
			return fmt.Errorf("%s exited before listening on %s (%v); see its log", c.name, addr, c.err)
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("waiting for %s on %s: %w", c.name, addr, ctx.Err())
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// findMosquitto resolves the mosquitto binary, also in /usr/sbin, which is not always on
// PATH.
func findMosquitto(name string) (string, error) {
	if name == "" {
		return "", errors.New("no -mosquitto binary given")
	}
	if p, err := exec.LookPath(name); err == nil {
		return p, nil
	}
	if p, err := exec.LookPath("/usr/sbin/" + name); err == nil {
		return p, nil
	}
	return "", fmt.Errorf("%s not found (apt-get install -y mosquitto)", name)
}
