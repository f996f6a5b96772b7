"""Run a script as if torch were not installed: `python tests/hide_torch.py SCRIPT [ARGS...]`.

Every import finder is wrapped so `torch` (and its submodules) cannot be found, which is what
`importlib.util.find_spec` and `import torch` see on a machine without it."""
import os
import runpy
import sys


class _Hidden:
    def __init__(self, finder):
        self.finder = finder

    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            return None
        find = getattr(self.finder, "find_spec", None)
        return find(name, path, target) if find else None

    def __getattr__(self, attr):
        return getattr(self.finder, attr)


def hide_torch():
    for name in [m for m in sys.modules if m == "torch" or m.startswith("torch.")]:
        del sys.modules[name]
    sys.meta_path[:] = [_Hidden(f) for f in sys.meta_path]


if __name__ == "__main__":
    hide_torch()
    script, sys.argv = sys.argv[1], sys.argv[1:]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))  # as `python script.py` does
    runpy.run_path(script, run_name="__main__")
