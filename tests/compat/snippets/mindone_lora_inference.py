# mindone's examples/transformers/qwen2_5_omni/infer_qwen2_5_omni_lora.py, its model loading,
# adapter merge and single-image inference as written there; only the imports name `mindone_ext`
# (PeftModel included), and LORA_PATH / IMAGE_PATH stand for its --lora_path / --image_path.
import mindspore as ms

from mindone_ext.nn.lora import PeftModel
from mindone_ext import Qwen2_5OmniForConditionalGeneration
from mindone_ext.models.qwen2_5_omni import Qwen2_5OmniProcessor
from mindone_ext.models.qwen2_5_omni.qwen_omni_utils import process_mm_info

model = Qwen2_5OmniForConditionalGeneration.from_pretrained(
    "Qwen/Qwen2.5-Omni-3B",
    attn_implementation="flash_attention_2",
    mindspore_dtype=ms.float16,
)
model.thinker.is_gradient_checkpointing = False
lora_model = PeftModel.from_pretrained(
    model.thinker,
    "LORA_PATH",
)  # get LoRA weights
lora_model.merge_and_unload()  # merge LoRA weights into the base model
model.thinker = lora_model.get_base_model()  # replace thinker with LoRA-enhanced model
model.set_train(False)

processor = Qwen2_5OmniProcessor.from_pretrained("Qwen/Qwen2.5-Omni-3B")


def inference(medium_path, prompt, medium_type="image", use_audio_in_video=False):
    sys_prompt = (
        "You are Qwen, a virtual human developed by the Qwen Team, Alibaba Group, capable of perceiving "
        "auditory and visual inputs, as well as generating text and speech."
    )
    messages = [
        {"role": "system", "content": [{"type": "text", "text": sys_prompt}]},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": prompt},
            ],
        },
    ]
    medium = None
    if medium_type == "video":
        medium = {
            "type": medium_type,
            "video": medium_path,
            "max_pixels": 360 * 420,
        }
    elif medium_type == "image":
        medium = {
            "type": medium_type,
            "image": medium_path,
            "max_pixels": 360 * 420,
        }
    if medium is not None:
        messages[1]["content"].append(medium)

    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    audios, images, videos = process_mm_info(messages, use_audio_in_video=use_audio_in_video)
    inputs = processor(
        text=text,
        audio=audios,
        images=images,
        videos=videos,
        return_tensors="np",
        padding=True,
        use_audio_in_video=use_audio_in_video,
    )

    # convert input to Tensor
    for key, value in inputs.items():  # by default input numpy array or list
        inputs[key] = ms.Tensor(value)
        if inputs[key].dtype == ms.int64:
            inputs[key] = inputs[key].to(ms.int32)
        else:
            inputs[key] = inputs[key].to(model.dtype)

    text_ids = model.generate(**inputs, use_audio_in_video=use_audio_in_video, return_audio=False)
    text_ids = [output_ids[len(input_ids) :] for input_ids, output_ids in zip(inputs.input_ids, text_ids)]
    text = processor.batch_decode(text_ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)[0]
    return text


response = inference("IMAGE_PATH", "Please convert the image content into LaTex", medium_type="image",
                     use_audio_in_video=False)
print(f"Response: {response}\n")
