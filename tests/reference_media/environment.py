"""The reference media stack's own virtual environment (requirements.txt beside), made once and
reused: ~3 minutes and ~6 GB (torch's CUDA build: the only torchvision that installs here).
MINDONE_REFERENCE_VENV names a folder to use; by default it lives in ~/.cache, keyed by the
requirements' contents. Used by the tests beside and by bench/media.py."""
import fcntl
import hashlib
import os
import shutil
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REQUIREMENTS = os.path.join(HERE, "requirements.txt")


def reference_python():
    """The reference environment's python, made first if needed."""
    with open(REQUIREMENTS, "rb") as f:
        key = hashlib.sha256(f.read()).hexdigest()[:12]
    folder = os.environ.get("MINDONE_REFERENCE_VENV") or os.path.join(
        os.path.expanduser("~"), ".cache", "mindone_ext", f"reference-media-{key}")
    python, done = os.path.join(folder, "bin", "python"), os.path.join(folder, "complete")
    os.makedirs(os.path.dirname(folder), exist_ok=True)
    with open(folder + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # test processes running side by side make it once
        if not os.path.exists(done):
            shutil.rmtree(folder, ignore_errors=True)  # a half-made one (an interrupted install)
            subprocess.run([sys.executable, "-m", "venv", folder], check=True)
            result = subprocess.run([python, "-m", "pip", "install", "--quiet", "-r", REQUIREMENTS],
                                    capture_output=True, text=True)
            if result.returncode:
                raise RuntimeError("installing the reference environment failed:\n"
                                   f"{result.stdout[-3000:]}{result.stderr[-3000:]}")
            with open(done, "w") as f:
                f.write(key)
    return python


def reference_environ(**extra):
    """Environment variables for a process of the reference environment: qwen-omni-utils reads
    video with decord, the reader it documents (it would pick torchcodec, installed there for
    transformers' own route, whose frame counts differ on some containers)."""
    return {**os.environ, "FORCE_QWENVL_VIDEO_READER": "decord", **extra}
