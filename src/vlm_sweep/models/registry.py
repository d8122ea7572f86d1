"""Model-family knowledge, as data, in one place.

Freezing, LoRA targeting and loading read this table; nothing else in the
package branches on the model family. Component paths are dotted module paths
as they appear in the transformers model (a PEFT wrapper's prefix is allowed in
front). A name belongs to the FIRST component in ``COMPONENT_ORDER`` whose path
it is under, so a projector nested inside the vision tower (Qwen's
``model.visual.merger``) is classified as the projector.

Pure data: importing this module must not import torch or transformers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

# Most specific first: embeddings and lm_head sit inside/next to the LM,
# projectors inside/next to the vision tower.
COMPONENT_ORDER: Tuple[str, ...] = (
    "embeddings",
    "lm_head",
    "vision_projection",
    "vision_tower",
    "audio_tower",
    "language_model",
)


@dataclass(frozen=True)
class ModelFamily:
    """How one family of VLMs is loaded and where its parts live."""

    # transformers Auto class used to load the model.
    auto_model_class: str
    # The processor class AutoProcessor must return (it silently falls back
    # to a bare tokenizer when it cannot build one).
    processor_class: str
    # component -> dotted module paths (see COMPONENT_ORDER).
    components: Dict[str, Tuple[str, ...]]
    # config.json "model_type" values of this family (to load exported/hub dirs).
    model_types: Tuple[str, ...] = ()
    # Extra keyword arguments for AutoProcessor.from_pretrained.
    processor_kwargs: Dict[str, object] = field(default_factory=dict)
    # Whether the model takes video parts (every family takes text and images). The data
    # pre-flight (vlm_sweep.data.preflight) refuses video records for a family without it.
    supports_video: bool = False
    # The most conversations one processor call may hold when any of them carries a video
    # (None: no limit). Training encodes one record per call; generation encodes its batch in
    # one call, so this bounds eval.batch_size for data sets with videos.
    video_conversations_per_call: Optional[int] = None
    # Whether one forward may carry image and video inputs together. False where images and video
    # frames fill the same placeholder token, so the model cannot tell whose features go where: the
    # collator refuses a micro-batch (or record) holding both, the pre-flight check a data set mixing
    # them at micro batches above 1.
    images_with_videos: bool = True
    # Fused mixture-of-experts weights: 3-D parameters (experts x out x in), not nn.Linear modules, named
    # by the suffix of their parameter path. LoRA reaches them through peft's ``target_parameters``
    # under the same component / glob rules as the linears (training/lora.py).
    expert_parameters: Tuple[str, ...] = ()
    # dataset.packing: the model's function (dotted from the transformers model) that computes one
    # conversation's multi-dimensional rotary position ids, e.g. mRoPE; None: 1-D positions
    # restarting per conversation are all the LM needs (vlm_sweep.data.packing).
    packed_rope_index: Optional[str] = None
    # dataset.packing: why packed rows cannot equal conversations run alone for this family (None:
    # they can); the config check refuses packing with this reason.
    packing_refused: Optional[str] = None
    # dataset.packing: module classes (transformers class names) that carry state along the sequence
    # (Mamba mixers) -> the kernel packages that keep packed sequences apart themselves given ``seq_idx``.
    # Packed, each such module runs once per conversation (fresh state) unless those packages import
    # (vlm_sweep.data.packed_recurrence).
    packed_recurrent_modules: Dict[str, Tuple[str, ...]] = field(default_factory=dict)
    # The batch key whose runs of 1s are media tokens attending to each other both ways (Gemma 3's
    # token_type_ids). Training batches of such a family get an explicit per-layer-type block mask
    # (data.packing.block_masks): packed, transformers would index that overlay by position ids (wrong
    # past a row's first conversation); padded, it would build it with torch.vmap (~30% of a tiny
    # model's CPU step).
    bidirectional_media: Optional[str] = None
    # Inputs the forward takes that the processor does not return, derived per encoded record: batch key ->
    # rule name in vlm_sweep.data.derived_inputs.RULES, applied in this order (empty: the processor's output
    # is the forward's input).
    derived_inputs: Dict[str, str] = field(default_factory=dict)
    # Processor outputs the forward does not accept (dropped per record, after derived_inputs).
    dropped_inputs: Tuple[str, ...] = ()

    @property
    def modalities(self) -> Tuple[str, ...]:
        """The media kinds a record may carry for this family, besides text."""
        return ("image", "video") if self.supports_video else ("image",)


def tiny_model_configs(video: bool = False) -> List[str]:
    """``model=`` options that build a tiny stand-in offline (``conf/model/tiny_<family>.yaml``);
    ``video``: only families that take videos."""
    from vlm_sweep.models.tiny import known_recipes

    return [f"tiny_{name}" for name in known_recipes()
            if name in MODEL_FAMILIES and (MODEL_FAMILIES[name].supports_video or not video)]


MODEL_FAMILIES: Dict[str, ModelFamily] = {
    "gemma3": ModelFamily(
        auto_model_class="AutoModelForImageTextToText",
        processor_class="Gemma3Processor",
        model_types=("gemma3",),
        components={
            "embeddings": ("model.language_model.embed_tokens",),
            "lm_head": ("lm_head",),
            "vision_projection": ("model.multi_modal_projector",),
            "vision_tower": ("model.vision_tower",),
            "audio_tower": (),
            "language_model": ("model.language_model",),
        },
        # Image tokens attend to their whole image (bidirectional block), the rest causally.
        bidirectional_media="token_type_ids",
    ),
    "qwen2_5_vl": ModelFamily(
        auto_model_class="AutoModelForImageTextToText",
        processor_class="Qwen2_5_VLProcessor",
        model_types=("qwen2_5_vl",),
        components={
            "embeddings": ("model.language_model.embed_tokens",),
            "lm_head": ("lm_head",),
            "vision_projection": ("model.visual.merger",),
            "vision_tower": ("model.visual",),
            "audio_tower": (),
            "language_model": ("model.language_model",),
        },
        supports_video=True,
        # mRoPE (temporal, height, width) ids depend on where each image/video sits in its conversation.
        packed_rope_index="model.get_rope_index",
    ),
    # Qwen3-VL: like Qwen2.5-VL, plus DeepStack mergers (model.visual.deepstack_merger_list) that project
    # early ViT blocks' features into the first decoder layers: projectors, like the final merger.
    "qwen3_vl": ModelFamily(
        auto_model_class="AutoModelForImageTextToText",
        processor_class="Qwen3VLProcessor",
        model_types=("qwen3_vl",),
        components={
            "embeddings": ("model.language_model.embed_tokens",),
            "lm_head": ("lm_head",),
            "vision_projection": ("model.visual.merger", "model.visual.deepstack_merger_list"),
            "vision_tower": ("model.visual",),
            "audio_tower": (),
            "language_model": ("model.language_model",),
        },
        supports_video=True,
        # Interleaved mRoPE (temporal, height, width) ids depend on where each image/video sits in its conversation.
        packed_rope_index="model.get_rope_index",
    ),
    # Nemotron Nano VL in transformers' native classes (model_type nemotron_h_omni): RADIO vision
    # model, pixel shuffle + MLP projector, hybrid Mamba2/attention/MoE Nemotron-H LM. No "model."
    # wrapper: the parts hang off the top-level module. Omni checkpoints (Nemotron 3 Nano Omni) add a
    # Parakeet audio branch (audio_tower + embed_audio projector).
    "nemotron_vl": ModelFamily(
        auto_model_class="AutoModelForImageTextToText",
        processor_class="NemotronH_Omni_Reasoning_V3Processor",
        model_types=("nemotron_h_omni",),
        components={
            "embeddings": ("language_model.model.embeddings",),
            "lm_head": ("language_model.lm_head",),
            # Checkpoints whose LM has MTP layers norm the vision features before the projector.
            "vision_projection": ("multi_modal_projector", "vision_final_layernorm"),
            "vision_tower": ("vision_model",),
            "audio_tower": ("audio_tower", "embed_audio"),
            "language_model": ("language_model",),
        },
        # The hub tokenizer has no pad token, which batching needs: pad with <unk>, the id (0) its
        # LM config names as pad (not eos: that is the end-of-turn token the model must learn).
        processor_kwargs={"pad_token": "<unk>"},
        supports_video=True,
        # Its processor takes videos with a single prompt only ("Videos are only supported with
        # a single prompt"): one conversation per call, so micro batches of 1 for video data.
        video_conversations_per_call=1,
        # Video frames fill <image> placeholders too ("Got 4 feature vectors for 12 placeholder tokens").
        images_with_videos=False,
        # NemotronHExperts (transformers/models/nemotron_h): routed experts as up_proj/down_proj tensors of
        # shape (n_routed_experts, out, in); the shared expert and Mamba/attention projections are Linears.
        expert_parameters=("mixer.experts.up_proj", "mixer.experts.down_proj"),
        # Its Mamba2 mixers (conv1d + selective scan) carry state along the row. transformers passes
        # ``seq_idx`` to the mamba_ssm / causal_conv1d kernels (they restart the state per sequence);
        # its PyTorch path takes no boundaries, so there each mixer runs once per packed conversation.
        packed_recurrent_modules={"NemotronHMamba2Mixer": ("mamba_ssm", "causal_conv1d")},
    ),
    # nvidia/NVIDIA-Nemotron-Nano-12B-v2-VL-BF16 through its hub remote code (trust_remote_code):
    # its auto_map offers AutoModel/AutoModelForCausalLM only. Module paths as in Megatron
    # Bridge's HF mapping (vision_model.radio_model.*, mlp1.*, language_model.backbone.*).
    #
    # Input contract, read from the hub repo's modeling.py / processing.py / image_processing.py (public
    # copies found by code search; thodel/training-atr-models docs/NEMOTRON_FEASIBILITY.md measured the hub
    # files themselves) and from how NVIDIA's trainers collate for it (NVIDIA-NeMo/Megatron-Bridge
    # src/megatron/bridge/models/nemotron_vl/data/collate_fn.py; NVIDIA-NeMo/Automodel
    # nemo_automodel/components/datasets/vlm/collate_fns.py, the collate mapped to NemotronNanoVLV2Processor):
    # - forward(pixel_values, input_ids, attention_mask, position_ids, image_flags, past_key_values/cache_params,
    #   labels, use_cache, output_attentions, output_hidden_states, return_dict): no **kwargs, no
    #   logits_to_keep, no num_patches; pixel_values has no default.
    # - pixel_values: (total tiles, 3, 512, 512), all images' tiles of the batch in order. Tiling (InternVL
    #   dynamic_preprocess): the grid (i, j) with 1 <= i*j <= max_num_tiles=12 closest to the aspect ratio,
    #   resize to 512i x 512j, cut into tiles, plus a 512x512 thumbnail when there is more than one tile.
    # - image_flags: (total tiles, 1) long; forward squeezes it unconditionally and keeps vit_embeds[flags == 1]
    #   (InternVL: 0 marks a text-only sample's dummy tile). The processor does not return it.
    # - num_image_token = (512 / 16)^2 * 0.5^2 = 256 per tile (RADIO patch 16, pixel shuffle 0.5). The processor
    #   expands each "<image>" the chat template renders into <img> + "<image>" x tiles*256 + </img>; forward
    #   writes the ViT rows, in order, into the positions equal to config.img_context_token_id (the "<image>" id).
    # - videos: processor(videos=frames) returns pixel_values_videos (a tile per frame) with "<video>" context
    #   tokens; the training forward takes none of it (generate() does). Megatron Bridge hands frames over as
    #   tiles with "<video>" ids replaced by "<image>" ids, and so does the tiles_in_bfloat16 rule.
    # - extract_feature casts ViT features and the projector output to bf16: tiles go in as bf16.
    # Checked against a stand-in with that forward (tests/test_nemotron_remote_contract.py), never the weights.
    "nemotron_vl_remote": ModelFamily(
        auto_model_class="AutoModelForCausalLM",
        processor_class="NemotronNanoVLV2Processor",
        model_types=("NemotronH_Nano_VL_V2",),
        components={
            "embeddings": ("language_model.backbone.embeddings",),
            "lm_head": ("language_model.lm_head",),
            "vision_projection": ("mlp1",),
            "vision_tower": ("vision_model",),
            "audio_tower": (),
            "language_model": ("language_model",),
        },
        processor_kwargs={"pad_token": "<unk>"},
        supports_video=True,
        # Assumed as for the native processor: the hub code cannot be checked offline, and a
        # wrong refusal costs a smaller micro batch where a wrong pass would crash mid-run.
        video_conversations_per_call=1,
        # Its Mamba2 mixers carry state along the row, and its hub forward (contract above: no **kwargs) takes
        # no ``seq_idx`` to hand the conversation boundaries down to them; the hub code cannot be run here to
        # prove a per-conversation split either (family nemotron_vl, the native classes, packs exactly).
        packing_refused="its hybrid Mamba2 language model carries recurrent state along the row, and its hub "
                        "remote code takes no sequence boundaries (no seq_idx) and cannot be checked offline "
                        "to restart that state per packed conversation",
        # See the contract above: frames as tiles and every tile bf16, then image_flags (a zero-flagged dummy
        # tile for a record without media); num_patches is the processor's, not a forward argument.
        derived_inputs={"pixel_values": "tiles_in_bfloat16", "image_flags": "ones_per_tile"},
        dropped_inputs=("num_patches",),
    ),
}


def get_family(name: str) -> ModelFamily:
    """Look a family up, failing with the list of known ones."""
    try:
        return MODEL_FAMILIES[name]
    except KeyError:
        raise KeyError(f"unknown model family {name!r}; known: {sorted(MODEL_FAMILIES)}") from None


def family_for_model_type(model_type: str) -> str:
    """The registry family whose model_types include a config.json model_type."""
    for name, family in MODEL_FAMILIES.items():
        if model_type in family.model_types:
            return name
    raise KeyError(f"no model family for model_type {model_type!r}; known: "
                   f"{sorted(t for f in MODEL_FAMILIES.values() for t in f.model_types)}")


def _under(name: str, path: str) -> bool:
    return f".{path}." in f".{name}."


def component_of(family: ModelFamily, name: str) -> str | None:
    """The component a module or parameter name belongs to (None if none)."""
    for component in COMPONENT_ORDER:
        if any(_under(name, path) for path in family.components.get(component, ())):
            return component
    return None
