"""The Thinker's and Talker's prefill and decode steps are stored graphs (generation/decode.py):
a new process loads them instead of compiling, and they write its own KV caches."""
import json
import os
import subprocess
import sys

from mindone_ext.utils.graph_cache import ENV

CHILD = """
import json, sys
import numpy as np
from mindone_ext import Qwen2_5OmniForConditionalGeneration

model = Qwen2_5OmniForConditionalGeneration.from_pretrained(sys.argv[1])
ids = np.random.default_rng(0).integers(0, 400, size=(1, 40))
text, wav = model.generate(input_ids=ids, attention_mask=np.ones_like(ids), max_new_tokens=6, eos_token_id=[],
                           spk="Ethan", talker_do_sample=False, talker_max_new_tokens=8, seed=0)
print(json.dumps({"text": text.asnumpy().tolist(), "samples": int(wav.shape[0])}))
"""


def test_a_new_process_loads_the_decoders_steps_and_answers_the_same(tiny_checkpoint, tmp_path):
    child, folder = tmp_path / "child.py", tmp_path / "graphs"
    child.write_text(CHILD)  # a file: MindSpore reads a compiled function's source back
    env = dict(os.environ, **{ENV: str(folder)})
    runs = []
    for _ in range(2):
        out = subprocess.run([sys.executable, str(child), tiny_checkpoint], env=env, capture_output=True, text=True,
                             check=True)
        files = {name: os.stat(folder / name).st_mtime_ns for name in os.listdir(folder)}
        runs.append((json.loads(out.stdout.strip().splitlines()[-1]), files))
    (first, first_files), (second, second_files) = runs
    steps = [name for name in first_files if name.startswith(("thinker_step-", "talker_step-"))]
    # a prompt's piece and a decode step for each decoder (greedy text: the answer is 6 new tokens)
    assert {name.split("-")[0] for name in steps} == {"thinker_step", "talker_step"} and len(steps) >= 4
    assert second_files == first_files  # the second process loaded every graph and wrote nothing
    assert second == first and len(first["text"][0]) == 46 and first["samples"] > 0
