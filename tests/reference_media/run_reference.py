"""The official media stack, run in its own environment (requirements.txt beside: qwen-omni-utils
with decord, librosa, torchvision and transformers' processor, which need a torch that this
project's test environment cannot have). Reads a JSON list of cases from argv[1] and writes what
the reference produces for each to the npz file argv[2]:

    {i}/audio/{j}, {i}/image/{j}, {i}/video/{j}    process_mm_info's outputs
    {i}/fps                                        its video sample rates
    {i}/inputs/{key}                               the processor's outputs
    {i}/error                                      the exception's text, when the case fails

A case: {"conversation": [...], "use_audio_in_video": bool, "direct": optional {"images": [image
files], "videos": [.npy files of frames]}: media given straight to the processor, without
process_mm_info; "chat": optional {arguments}: the processor's own apply_chat_template(tokenize=True,
...) loads the media, as transformers' model card does}; argv[3] is the processor's folder.
"""
import json
import sys

import numpy as np


def main(spec_path, out_path, processor_folder):
    from qwen_omni_utils import process_mm_info
    from transformers import Qwen2_5OmniProcessor

    with open(spec_path) as f:
        cases = json.load(f)
    processor = Qwen2_5OmniProcessor.from_pretrained(processor_folder)
    out = {}
    for i, case in enumerate(cases):
        try:
            if "chat" in case:  # transformers' own route: the processor loads the media (torchcodec)
                inputs = processor.apply_chat_template(case["conversation"], add_generation_prompt=True, tokenize=True,
                                                       return_dict=True, return_tensors="pt", padding=True,
                                                       **case["chat"])
                for key, value in inputs.items():
                    out[f"{i}/inputs/{key}"] = value.numpy()
                continue
            if "direct" in case:
                from PIL import Image

                audios, kwargs = None, {}
                images = [Image.open(path) for path in case["direct"].get("images", [])] or None
                videos = [np.load(path) for path in case["direct"].get("videos", [])] or None
            else:
                audios, images, videos, kwargs = process_mm_info(case["conversation"], case["use_audio_in_video"],
                                                                 return_video_kwargs=True)
            batch = isinstance(case["conversation"][0], list)
            text = [processor.apply_chat_template(c, add_generation_prompt=True, tokenize=False)
                    for c in (case["conversation"] if batch else [case["conversation"]])]
            # as Qwen2.5-Omni's model card calls it
            inputs = processor(text=text, audio=audios, images=images, videos=videos, return_tensors="pt",
                               padding=True, use_audio_in_video=case["use_audio_in_video"])
        except Exception as e:  # noqa: BLE001  (the reference refusing an input is a result too)
            out[f"{i}/error"] = np.array(f"{type(e).__name__}: {e}")
            continue
        for kind, items in (("audio", audios), ("image", images), ("video", videos)):
            for j, item in enumerate(items or []):
                out[f"{i}/{kind}/{j}"] = np.asarray(item.numpy() if hasattr(item, "numpy") else item)
        out[f"{i}/fps"] = np.asarray(kwargs.get("fps", []), np.float64)
        for key, value in inputs.items():
            out[f"{i}/inputs/{key}"] = value.numpy() if hasattr(value, "numpy") else np.asarray(value)
    np.savez(out_path, **out)


if __name__ == "__main__":
    main(*sys.argv[1:4])
