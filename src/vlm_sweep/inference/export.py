"""Export a checkpoint as a plain Hugging Face model dir.

With ``merge_lora`` (or for a full fine-tune) the output is a full model (safetensors shards,
config, generation config, processor with chat template) that loads with plain
``AutoModelForImageTextToText`` / ``AutoProcessor``. Without it, an adapter checkpoint is
exported as a PEFT adapter whose adapter_config.json names the base model (also written
to ``BASE_MODEL``). Used by the export command and by training (``checkpoint.save_consolidated``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from vlm_sweep.errors import CheckpointError


def export_checkpoint(checkpoint: str, output: str, merge_lora: bool = False,
                      max_shard_size: str = "5GB") -> Path:
    """Write the export; returns the output dir. Written to a temp dir first, then renamed (never half-written)."""
    from vlm_sweep.inference.load import load_for_inference, resolve_checkpoint
    from vlm_sweep.rundir import BASE_MODEL

    model_dir, _, _ = resolve_checkpoint(checkpoint)  # a missing or empty checkpoint: before anything is written
    out = Path(output)
    tmp = out.with_name(f".{out.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    is_adapter = (model_dir / "adapter_config.json").exists()
    if is_adapter and not merge_lora:
        shutil.copytree(model_dir, tmp)
        adapter = json.loads((tmp / "adapter_config.json").read_text())
        if "base_model_name_or_path" not in adapter:
            shutil.rmtree(tmp)
            raise CheckpointError(f"{model_dir / 'adapter_config.json'} names no base_model_name_or_path")
        (tmp / BASE_MODEL).write_text(adapter["base_model_name_or_path"] + "\n")
    else:
        loaded = load_for_inference(checkpoint, merge_lora=True)
        loaded.model.save_pretrained(tmp, max_shard_size=max_shard_size)
        loaded.processor.save_pretrained(tmp)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out
