# mindone's Qwen2.5-Omni README: "Single Media inference" with the user's content being an image
# (the shape of its infer_qwen2_5_omni_lora.py messages), and its "Usage Tips" put together:
# image resolution trade-off, audio output enabled, both voice types. Only the imports name
# `mindone_ext`.
import soundfile as sf
import numpy as np
import mindspore as ms
from mindone_ext import Qwen2_5OmniForConditionalGeneration
from mindone_ext.models.qwen2_5_omni import Qwen2_5OmniProcessor
from mindone_ext.models.qwen2_5_omni.qwen_omni_utils import process_mm_info

min_pixels = 128*28*28
max_pixels = 768*28*28
processor = Qwen2_5OmniProcessor.from_pretrained("Qwen/Qwen2.5-Omni-7B", min_pixels=min_pixels, max_pixels=max_pixels)

model = Qwen2_5OmniForConditionalGeneration.from_pretrained(
    "Qwen/Qwen2.5-Omni-7B",
    enable_audio_output=True,
)

conversation = [
    {
        "role": "system",
        "content": [
            {"type": "text",
             "text": "You are Qwen, a virtual human developed by the Qwen Team, Alibaba Group, capable of perceiving auditory and visual inputs, as well as generating text and speech."}
        ],
    },
    {
        "role": "user",
        "content": [
            {"type": "text", "text": "Please convert the image content into LaTex"},
            {"type": "image", "image": "/path/to/image.jpg", "max_pixels": 360 * 420},
        ],
    },
]

text = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
audios, images, videos = process_mm_info(conversation, use_audio_in_video=False)
inputs = processor(text=text, audio=audios, images=images, videos=videos, return_tensors="np", padding=True,
                   use_audio_in_video=False)

# convert input to Tensor
for key, value in inputs.items():
    if isinstance(value, np.ndarray):
        inputs[key] = ms.Tensor(value)
    if inputs[key].dtype == ms.int64:
        inputs[key] = inputs[key].to(ms.int32)
    else:
        inputs[key] = inputs[key].to(model.dtype)

text_ids = model.generate(**inputs, return_audio=False)

text_ids, audio = model.generate(**inputs, spk="Chelsie")
sf.write("chelsie.wav", audio.reshape(-1).asnumpy(), samplerate=24000)

text_ids, audio = model.generate(**inputs, spk="Ethan")
sf.write("ethan.wav", audio.reshape(-1).asnumpy(), samplerate=24000)
