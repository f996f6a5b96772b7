"""A voice server in a child process, for tests, benchmarks and scripts that need one running."""
import os
import re
import resource
import subprocess
import sys
import threading


class ServerProcess:
    """`python -m mindone_ext.serve --model_path PATH --port 0 ARGS...`, started and waited for.

        with ServerProcess(path, "--max_active", "2") as server:
            server.url          # http://127.0.0.1:PORT
            server.rss_mb()     # the server's resident memory

    `address_space_limit`: bytes of virtual memory the server may map (RLIMIT_AS), a hard cap
    its allocations cannot pass.
    """

    def __init__(self, model_path, *args, startup_timeout=300, env=None, address_space_limit=None, python=None,
                 cwd=None, replace_env=False):
        """`python`: the interpreter to run (default: this one); `env`: added to this process's
        environment, or the whole environment with `replace_env`."""
        self.log = []
        self.imported_from = None  # the folder the server's mindone_ext was imported from
        command = [python or sys.executable, "-m", "mindone_ext.serve", "--model_path", str(model_path), "--port", "0",
                   *map(str, args)]

        def limit():
            resource.setrlimit(resource.RLIMIT_AS, (address_space_limit, address_space_limit))

        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=cwd,
                                        env=dict(env or {}) if replace_env else {**os.environ, **(env or {})},
                                        preexec_fn=limit if address_space_limit else None)
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
            package = re.match(r"mindone_ext \S+ from (.+)", line)
            if package:
                self.imported_from = package.group(1).strip()
            match = re.match(r"serving on (http://\S+)", line)
            if match and self.url is None:
                self.url = match.group(1)
                self._ready.set()
        self._ready.set()

    def rss_mb(self, field="VmRSS"):
        """Resident memory in MB (`field` "VmHWM": its peak so far)."""
        with open(f"/proc/{self.process.pid}/status") as f:
            return int(re.search(field + r":\s+(\d+) kB", f.read()).group(1)) / 1024

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
