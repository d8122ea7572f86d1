"""A tiny stand-in for the hub's Nemotron Nano V2 VL remote code, as its published input contract describes it.

Not the hub code (none of it is copied): a processor and a model written from the contract recorded in the
registry's ``nemotron_vl_remote`` entry, at toy sizes, from transformers' own pieces (ProcessorMixin,
ImageProcessingMixin, a native Llama LM). What they share with the hub classes is what the data path meets:

- ``NemotronNanoVLV2Processor`` (same class name, so the registry finds the family by it): InternVL dynamic
  tiling (grid closest to the aspect ratio among 1 <= cols*rows <= max_num_tiles, a thumbnail when there
  is more than one tile), each ``<image>`` expanded into ``<img>`` + ``<image>`` x tiles * num_image_token +
  ``</img>``, returns ``input_ids``, ``attention_mask``, ``pixel_values``, ``num_patches``; videos: one tile
  per frame in ``pixel_values_videos`` with ``<video>`` context tokens. Padding kwargs are ignored (the hub
  processor tokenises with no padding either).
- ``StandInNanoVLV2.forward``: the hub signature (no ``**kwargs``, no ``logits_to_keep``, ``pixel_values``
  without default) and its input handling: ``image_flags.squeeze(-1)`` with no None guard, the vision
  features of flagged tiles written in order into the ``img_context_token_id`` positions (a count mismatch
  warns and fills a prefix, as the hub does), a bf16 vision model and projector (fp32 tiles fail there).
"""

from __future__ import annotations

import warnings
from typing import Any, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from torch import nn
from transformers import (BatchFeature, LlamaConfig, LlamaForCausalLM, PretrainedConfig, PreTrainedModel,
                          ProcessorMixin)
from transformers.image_processing_utils import ImageProcessingMixin

TILE = 16  # the hub: 512
PATCH = 4  # the hub: 16 (RADIO)
DOWNSAMPLE = 0.5  # pixel shuffle, as the hub
MAX_TILES = 6  # the hub: 12
TOKENS_PER_TILE = int((TILE // PATCH) ** 2 * DOWNSAMPLE ** 2)  # the hub: 256


def tile_grid(width: int, height: int, max_tiles: int = MAX_TILES, tile: int = TILE) -> Tuple[int, int]:
    """(cols, rows) per InternVL's rule: the grid whose aspect ratio is closest to the image's; on a tie the
    larger grid when the image covers more than half of it."""
    grids = sorted({(c, r) for c in range(1, max_tiles + 1) for r in range(1, max_tiles + 1) if c * r <= max_tiles},
                   key=lambda g: g[0] * g[1])
    best, best_diff = (1, 1), float("inf")
    for cols, rows in grids:
        diff = abs(width / height - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and width * height > 0.5 * tile * tile * cols * rows:
            best = (cols, rows)
    return best


class TiledImageProcessor(ImageProcessingMixin):
    """Dynamic tiling into TILE x TILE tiles plus a thumbnail, normalised to [-1, 1]."""

    model_input_names = ["pixel_values"]

    def __init__(self, image_size: int = TILE, patch_size: int = PATCH, downsample_ratio: float = DOWNSAMPLE,
                 max_num_tiles: int = MAX_TILES, use_thumbnail: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.image_size, self.patch_size, self.downsample_ratio = image_size, patch_size, downsample_ratio
        self.max_num_tiles, self.use_thumbnail = max_num_tiles, use_thumbnail

    def _tensor(self, image: Image.Image) -> torch.Tensor:
        data = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32).copy())
        return (data.permute(2, 0, 1) / 127.5) - 1.0

    def tiles(self, image: Image.Image) -> List[torch.Tensor]:
        size = self.image_size
        cols, rows = tile_grid(*image.size, self.max_num_tiles, size)
        grid = image.convert("RGB").resize((cols * size, rows * size), Image.BICUBIC)
        out = [self._tensor(grid.crop((c * size, r * size, (c + 1) * size, (r + 1) * size)))
               for r in range(rows) for c in range(cols)]
        if self.use_thumbnail and len(out) > 1:
            out.append(self._tensor(image.convert("RGB").resize((size, size), Image.BICUBIC)))
        return out

    def __call__(self, images: Sequence[Image.Image]) -> BatchFeature:
        per_image = [self.tiles(image) for image in images]
        return BatchFeature({"pixel_values": torch.stack([t for tiles in per_image for t in tiles]),
                             "num_patches": torch.tensor([len(tiles) for tiles in per_image])})


def _flat(items: Any) -> list:
    if items is None:
        return []
    if not isinstance(items, (list, tuple)):
        return [items]
    return [x for item in items for x in _flat(item)] if any(isinstance(i, (list, tuple)) for i in items) \
        else list(items)


class NemotronNanoVLV2Processor(ProcessorMixin):
    """Tiles images, expands ``<image>`` into context tokens, tokenises without padding."""

    def __init__(self, image_processor: Optional[TiledImageProcessor] = None, tokenizer: Any = None,
                 chat_template: Optional[str] = None, **kwargs: Any) -> None:
        super().__init__(image_processor, tokenizer, chat_template=chat_template)
        self.image_token_id = tokenizer.convert_tokens_to_ids("<image>")
        self.num_image_token = int((image_processor.image_size // image_processor.patch_size) ** 2
                                   * image_processor.downsample_ratio ** 2)

    def _context(self, token: str, tiles: int) -> str:
        return "<img>" + token * (tiles * self.num_image_token) + "</img>"

    def __call__(self, text: Any = None, images: Any = None, videos: Any = None, return_tensors: Any = None,
                 **kwargs: Any) -> BatchFeature:
        texts = [text] if isinstance(text, str) else list(text)
        data: dict = {}
        images = _flat(images)
        if images:
            media = self.image_processor(images)
            counts = iter(media["num_patches"].tolist())
            texts = ["".join(part if i == 0 else self._context("<image>", next(counts)) + part
                             for i, part in enumerate(t.split("<image>"))) for t in texts]
            data.update(media)
        if videos:
            if len(texts) != 1:
                raise ValueError("videos take a single prompt")
            frames = _flat(videos)
            size = self.image_processor.image_size
            data["pixel_values_videos"] = torch.stack(
                [self.image_processor._tensor(f.convert("RGB").resize((size, size), Image.BICUBIC)) for f in frames])
            expanded = "".join(f"Frame {i + 1}: " + self._context("<video>", 1) for i in range(len(frames)))
            texts = [texts[0].replace("<video>", expanded, 1)]
        encoded = self.tokenizer(texts, add_special_tokens=False)
        return BatchFeature({**encoded, **data}, tensor_type=return_tensors)


class StandInConfig(PretrainedConfig):
    model_type = "nemotron_remote_standin"

    def __init__(self, img_context_token_id: int = 0, vocab_size: int = 64, hidden_size: int = 32,
                 vit_hidden_size: int = 8, projector_hidden_size: int = 16, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.img_context_token_id, self.vocab_size, self.hidden_size = img_context_token_id, vocab_size, hidden_size
        self.vit_hidden_size, self.projector_hidden_size = vit_hidden_size, projector_hidden_size


class SquaredReLU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x) ** 2


class StandInNanoVLV2(PreTrainedModel):
    """Patch-embedding "ViT", pixel shuffle, RMSNorm/Linear/ReLU^2/Linear projector, native Llama LM."""

    config_class = StandInConfig
    main_input_name = "pixel_values"

    def __init__(self, config: StandInConfig) -> None:
        super().__init__(config)
        self.language_model = LlamaForCausalLM(LlamaConfig(
            vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=64, num_hidden_layers=1,
            num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=4096))
        merged = config.vit_hidden_size * int(1 / DOWNSAMPLE) ** 2
        self.vision_model = nn.Conv2d(3, config.vit_hidden_size, PATCH, stride=PATCH).to(torch.bfloat16)
        self.mlp1 = nn.Sequential(nn.RMSNorm(merged, eps=1e-5), nn.Linear(merged, config.projector_hidden_size,
                                  bias=False), SquaredReLU(), nn.Linear(config.projector_hidden_size,
                                                                       config.hidden_size, bias=False)
                                  ).to(torch.bfloat16)
        self.post_init()

    def extract_feature(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.vision_model(pixel_values).flatten(2).transpose(1, 2)  # (tiles, patches, vit)
        n, p, c = x.shape
        side = int(p ** 0.5)
        x = x.reshape(n, side // 2, 2, side // 2, 2, c).permute(0, 1, 3, 2, 4, 5).reshape(n, -1, 4 * c)
        return self.mlp1(x).to(torch.bfloat16)

    def forward(self, pixel_values: torch.FloatTensor, input_ids: torch.LongTensor = None,
                attention_mask: Optional[torch.Tensor] = None, position_ids: Optional[torch.LongTensor] = None,
                image_flags: Optional[torch.LongTensor] = None, past_key_values: Any = None,
                labels: Optional[torch.LongTensor] = None, use_cache: Optional[bool] = None,
                output_attentions: Optional[bool] = None, output_hidden_states: Optional[bool] = None,
                return_dict: Optional[bool] = None) -> Any:
        image_flags = image_flags.squeeze(-1)  # no None guard, as the hub forward
        embeds = self.language_model.get_input_embeddings()(input_ids).clone()
        vit = self.extract_feature(pixel_values)[image_flags == 1]
        batch, length, width = embeds.shape
        embeds = embeds.reshape(batch * length, width)
        selected = input_ids.reshape(-1) == self.config.img_context_token_id
        rows = vit.reshape(-1, width).to(embeds.dtype)
        if int(selected.sum()) != rows.shape[0]:
            warnings.warn(f"{int(selected.sum())} image context tokens, {rows.shape[0]} vision rows")
        positions = selected.nonzero().squeeze(-1)[: rows.shape[0]]
        embeds = embeds.index_copy(0, positions, rows[: positions.numel()])
        return self.language_model(inputs_embeds=embeds.reshape(batch, length, width), attention_mask=attention_mask,
                                   position_ids=position_ids, labels=labels, use_cache=use_cache,
                                   output_attentions=output_attentions, output_hidden_states=output_hidden_states,
                                   return_dict=return_dict)
