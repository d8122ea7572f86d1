"""Peak host memory of training steps, one variant per fresh process (so peaks never mix).

    python scripts/bench/memory.py loss old|new|none HIDDEN INTERMEDIATE VOCAB LAYERS SEQ LABELLED
    python scripts/bench/memory.py ckpt off|on SIZE SEQ STEPS ROWS

``loss``: one forward+backward of a Gemma3ForCausalLM at the given widths (LoRA on the decoder,
base weights frozen, fp32) with the old loss (full logits[:, :-1].float() + cross-entropy over
every position) or the new one (vlm_sweep.training.loss.summed_token_loss); ``none`` is the
decoder alone (no LM head, no loss), the part of the step both losses share.
``ckpt``: a few optimizer steps of the benchmark VLM (size tiny/30m) on one synthetic text batch of
ROWS x SEQ tokens, with or without vlm_sweep.train.enable_activation_checkpointing; the losses come back
so the parent can check both runs computed the same thing.

Memory is read from /proc/self/status: VmRSS just before the step (weights, optimizer, libraries)
and VmHWM, the resident high-water mark, reset right before the step (clear_refs 5), so ``step``
is what the step itself added. Where the reset is refused, ru_maxrss (since process start) is used.
"""

from __future__ import annotations

import gc
import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import PREFIX, loop_config  # noqa: E402  (sets the thread/cache environment)

MIB = 2**20


def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def measure(step: Callable[[], Any]) -> Dict[str, Any]:
    """Run ``step`` and return its result with the memory it took (MiB)."""
    gc.collect()
    baseline = _status_kib("VmRSS") * 1024
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        reset = True
    except OSError:
        reset = False
    started = time.perf_counter()
    result = step()
    seconds = time.perf_counter() - started
    peak = _status_kib("VmHWM") * 1024 if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"baseline_mib": baseline / MIB, "peak_mib": peak / MIB, "step_mib": (peak - baseline) / MIB,
            "seconds": seconds, "peak_reset": reset, "result": result}


def all_cores() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def old_summed_loss(model: Any, batch: Dict[str, Any]) -> Any:
    """The loss before vlm_sweep.training.loss: logits for every position, upcast, then cross-entropy."""
    import torch.nn.functional as F

    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs, use_cache=False).logits
    shifted = logits[:, :-1, :].float()
    return F.cross_entropy(shifted.reshape(-1, shifted.size(-1)), batch["labels"][:, 1:].reshape(-1),
                           ignore_index=-100, reduction="sum")


def backbone_only(model: Any, batch: Dict[str, Any]) -> Any:
    """Reference: the decoder's forward/backward without any LM head or loss (a stand-in scalar of the
    final hidden states at the labelled positions), so step memory splits into backbone + loss head."""
    from vlm_sweep.training.loss import labelled_positions

    inputs = {k: v for k, v in batch.items() if k != "labels"}
    hidden = model.get_base_model().model(**inputs, use_cache=False).last_hidden_state
    return hidden[labelled_positions(batch["labels"])[0]].pow(2).mean(-1).sum()


def loss_variant(which: str, hidden: int, intermediate: int, vocab: int, layers: int, seq: int,
                 labelled: int) -> Dict[str, Any]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    from vlm_sweep.training.loss import summed_token_loss

    torch.set_num_threads(all_cores())
    config = Gemma3TextConfig(  # Gemma 3 4B's widths and vocabulary
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=8, num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256,
        sliding_window=1024, layer_types=["sliding_attention"] * (layers - 1) + ["full_attention"])
    torch.manual_seed(0)
    model = Gemma3ForCausalLM._from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=32, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    model.train()
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(4, vocab, (1, seq), generator=generator)
    labels = torch.full_like(input_ids, -100)
    labels[:, seq - labelled:] = input_ids[:, seq - labelled:]  # an answer at the end: `labelled` targets
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}
    loss_fn = {"old": old_summed_loss, "new": summed_token_loss, "none": backbone_only}[which]

    def step() -> float:
        loss = loss_fn(model, batch)
        (loss / labelled).backward()
        return float(loss) / labelled

    out = measure(step)
    out["params_m"] = sum(p.numel() for p in model.parameters()) / 1e6
    return out


def ckpt_variant(which: str, size: str, seq: int, steps: int, rows: int) -> Dict[str, Any]:
    import torch

    from bench.common import build_parts
    from vlm_sweep.training.loss import count_label_tokens, summed_token_loss

    torch.set_num_threads(all_cores())  # time only: a peak does not depend on it
    cfg = loop_config(size, steps, [f"parallel.activation_checkpointing={'true' if which == 'on' else 'false'}",
                                    "dataset.num_workers=0"])
    parts = build_parts(cfg)
    model, optimizer, scheduler = parts.model, parts.optimizer, parts.scheduler
    tokenizer = parts.processor.tokenizer
    generator = torch.Generator().manual_seed(0)
    low = len(tokenizer.all_special_ids) + 256  # ordinary text tokens (after specials and byte tokens)
    input_ids = torch.randint(low, len(tokenizer) - 1, (rows, seq), generator=generator)
    labels = torch.full_like(input_ids, -100)
    labels[:, -seq // 4:] = input_ids[:, -seq // 4:]
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
             "token_type_ids": torch.zeros_like(input_ids), "labels": labels}
    trainable = [p for p in model.parameters() if p.requires_grad]
    model.train()

    def train() -> List[float]:
        losses = []
        for _ in range(steps):
            summed = summed_token_loss(model, batch)
            (summed / count_label_tokens(batch)).backward()
            torch.nn.utils.clip_grad_norm_(trainable, cfg.optimizer.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(summed) / count_label_tokens(batch))
        return losses

    out = measure(train)
    out["params_m"] = sum(p.numel() for p in model.parameters()) / 1e6
    out["batch_rows"] = rows
    return out


def main(argv: List[str]) -> int:
    kind, which, rest = argv[0], argv[1], argv[2:]
    if kind == "loss":
        out = loss_variant(which, *(int(a) for a in rest))
    elif kind == "ckpt":
        out = ckpt_variant(which, rest[0], *(int(a) for a in rest[1:]))
    else:
        raise SystemExit(f"unknown measurement {kind!r}")
    print(PREFIX + json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
