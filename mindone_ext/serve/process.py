"""A voice server in a child process, for tests, benchmarks and scripts that need one running."""
import os
import re
import subprocess
import sys
import threading


class ServerProcess:
    """`python -m mindone_ext.serve --model_path PATH --port 0 ARGS...`, started and waited for.

        with ServerProcess(path, "--max_active", "2") as server:
            server.url          # http://127.0.0.1:PORT
            server.rss_mb()     # the server's resident memory
    """

    def __init__(self, model_path, *args, startup_timeout=300, env=None):
        self.log = []
        command = [sys.executable, "-m", "mindone_ext.serve", "--model_path", str(model_path), "--port", "0",
                   *map(str, args)]
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                        env={**os.environ, **(env or {})})
        self.url = None
        self._ready = threading.Event()  # set at "serving on ..." or when the output ends
        threading.Thread(target=self._drain, daemon=True).start()  # also keeps the pipe from filling
        if not self._ready.wait(startup_timeout):
            self.stop()
            raise RuntimeError(f"the server did not start within {startup_timeout} s:\n" + "".join(self.log[-40:]))
        if self.url is None:
            raise RuntimeError("the server exited before serving:\n" + "".join(self.log[-40:]))

    @property
    def ws_url(self):
        return self.url.replace("http://", "ws://") + "/v1/voice"

    def _drain(self):
        for line in self.process.stdout:
            self.log.append(line)
            match = re.match(r"serving on (http://\S+)", line)
            if match and self.url is None:
                self.url = match.group(1)
                self._ready.set()
        self._ready.set()

    def rss_mb(self):
        with open(f"/proc/{self.process.pid}/status") as f:
            return int(re.search(r"VmRSS:\s+(\d+) kB", f.read()).group(1)) / 1024

    def stop(self):
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()
