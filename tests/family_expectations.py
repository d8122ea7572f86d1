"""What each tiny family's build must look like: one row per tiny recipe, read by the family contract tests.

Adding a model family adds its row here (README: "Adding a model family, a data set or a PEFT method").
"""

from __future__ import annotations

from omegaconf import OmegaConf

from conftest import FAMILIES, ROOT

# Per tiny recipe: classes, the template's user and assistant headers, what it puts between an answer and the
# end-of-turn token, image tokens per 64x64 image, a forward+backward time bound, and vision-path parameters
# an image batch does not use (video-only).
EXPECTED = {
    "gemma3": dict(
        model_cls="Gemma3ForConditionalGeneration", processor_cls="Gemma3Processor", tokenizer_cls="GemmaTokenizer",
        user="<start_of_turn>user\n", header="<start_of_turn>model\n", sep="", end="<end_of_turn>",
        image_tokens=16, step_s=0.2, video_only=(),
    ),
    "qwen2_5_vl": dict(
        model_cls="Qwen2_5_VLForConditionalGeneration", processor_cls="Qwen2_5_VLProcessor",
        tokenizer_cls="Qwen2Tokenizer", user="<|im_start|>user\n", header="<|im_start|>assistant\n", sep="",
        end="<|im_end|>",
        image_tokens=4,  # 64x64 -> smart_resize 56x56 -> 4x4 patches of 14 -> 2x2 after the 2x2 merge
        step_s=0.2, video_only=(),
    ),
    "qwen3_vl": dict(
        model_cls="Qwen3VLForConditionalGeneration", processor_cls="Qwen3VLProcessor",
        tokenizer_cls="Qwen2Tokenizer", user="<|im_start|>user\n", header="<|im_start|>assistant\n", sep="",
        end="<|im_end|>",
        image_tokens=4,  # 64x64 -> smart_resize 64x64 -> 4x4 patches of 16 -> 2x2 after the 2x2 merge
        step_s=0.2, video_only=(),
    ),
    "nemotron_vl": dict(
        model_cls="NemotronH_Omni_Reasoning_V3", processor_cls="NemotronH_Omni_Reasoning_V3Processor",
        tokenizer_cls="TokenizersBackend", user="<SPECIAL_11>User\n", header="<SPECIAL_11>Assistant\n<think>\n",
        sep="\n", end="<SPECIAL_12>",
        image_tokens=4,  # 64 px / 16 px patches -> 4x4 -> 2x2 after the pixel shuffle
        step_s=0.5,  # Mamba2 on its PyTorch path
        video_only=("vision_model.embeddings.video_patch_projection",),
    ),
}
MODEL_YAMLS = {name: OmegaConf.load(ROOT / "conf" / "model" / f"{name}.yaml") for name in FAMILIES}
FAMILY_OF = {y.tiny_recipe: y.family for y in MODEL_YAMLS.values()}  # tiny recipe -> registry family
RECIPES = sorted(FAMILY_OF)
