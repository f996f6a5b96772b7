# mindone's Qwen2.5-Omni README, "Text-only generation", as written there; only the two
# `mindone.transformers` imports now name `mindone_ext` (and process_mm_info's, which the README
# uses without importing it).
import mindspore as ms
from mindone_ext import Qwen2_5OmniForConditionalGeneration
from mindone_ext.models.qwen2_5_omni import Qwen2_5OmniProcessor
from mindone_ext.models.qwen2_5_omni.qwen_omni_utils import process_mm_info

model = Qwen2_5OmniForConditionalGeneration.from_pretrained(
    "Qwen/Qwen2.5-Omni-7B",
    mindspore_dtype=ms.float16,
    attn_implementation="flash_attention_2",
)
processor = Qwen2_5OmniProcessor.from_pretrained("Qwen/Qwen2.5-Omni-7B")

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
            {
                "type": "video",
                "video": "/path/to/video.mp4",
                "max_pixels": 360 * 420,
            },
            {"type": "text", "text": "What cant you hear and see in this video?"},
        ],
    },
]

# Preparation for inference
USE_AUDIO_IN_VIDEO = True  # set use audio in video

text = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
audios, images, videos = process_mm_info(conversation, use_audio_in_video=USE_AUDIO_IN_VIDEO)
inputs = processor(text=text, audio=audios, images=images, videos=videos, return_tensors="np", padding=True,
                   use_audio_in_video=USE_AUDIO_IN_VIDEO)

# convert input to Tensor
for key, value in inputs.items():
    inputs[key] = ms.Tensor(value)
    if inputs[key].dtype == ms.int64:
        inputs[key] = inputs[key].to(ms.int32)
    else:
        inputs[key] = inputs[key].to(model.dtype)

# Inference: Generation of the output text and audio
# set not to return audio
text_ids = model.generate(**inputs, use_audio_in_video=USE_AUDIO_IN_VIDEO, return_audio=False)
text_ids = [
    output_ids[len(input_ids):] for input_ids, output_ids in zip(inputs.input_ids, text_ids)
]
text = processor.batch_decode(text_ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
print(text)
