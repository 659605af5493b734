"""Wait for a server started in the background to answer /health; exit 1 if it exits first, or after 150 s.

    python benchmarks/wait_for_server.py PID [BASE_URL]     (default http://127.0.0.1:8000)"""
import sys
import time
import urllib.request


def exited(pid: int) -> bool:
    try:    # a child the shell has not reaped yet is a zombie, state Z
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def main():
    pid, url = int(sys.argv[1]), (sys.argv[2] if len(sys.argv) > 2 else "http://127.0.0.1:8000")
    deadline = time.monotonic() + 150
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"{url}/health", timeout=1)
            return 0
        except OSError:
            if exited(pid):
                print(f"the server (pid {pid}) exited before it answered", file=sys.stderr)
                return 1
            time.sleep(0.5)
    print(f"the server (pid {pid}) did not answer {url}/health in 150 s", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
