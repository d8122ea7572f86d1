"""Training throughput of the real Gemma 3 4B and Qwen2.5-VL 3B architectures on one GPU.

    python scripts/gpu_benchmark.py --out gpu_benchmark.json          # both models, LoRA + full SFT
    python scripts/gpu_benchmark.py --models qwen2_5_vl --modes full --steps 50
    python scripts/gpu_benchmark.py --tiny --steps 2 --out /tmp/b.json  # the same path on a CPU (tests)

No hub: each model is built with random weights from its published config.json (written out
below), saved with a processor into a scratch dir and then trained by the project's own recipe,
``vlm_sweep.train.run`` with ``model.pretrained_model_name_or_path=<dir>`` (tracking, checkpoints
and generation eval off), on synthetic CORD-v2 receipts. The processor is the tiny model's
(vlm_sweep.models.tiny: its tokenizer has ~2k tokens, all inside the real vocabulary, so token ids
stay in range) with the real image settings: Gemma 3 at 896x896 -> 256 image tokens, Qwen2.5-VL at
its min/max pixels. Numbers come from the run's metrics.jsonl, the same ones a training run logs:
tokens/s, TFLOP/s and MFU per device (vision tower included), peak memory, step time; steps
before ``--warmup`` are left out. One failing run (OOM, ...) gets an error row; the others go on.
Extra Hydra overrides after the options apply to every run (``freeze=none``, ...).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parents[1]
MODES = ("lora", "full")
MODE_OVERRIDES = {"lora": ["peft=lora"], "full": ["peft=none"]}
TOKEN_ID_KEY = re.compile(r"_token_(id|ids|index)$")
# Files of the tiny build that the benchmark checkpoint takes as they are (tokenizer, template).
NOT_COPIED = {"config.json", "model.safetensors", "processor_config.json", "tiny_build.json"}
SHM_NEEDED = 24 * 2**30  # one bf16 checkpoint (<= 8.6 GB) plus ample room for DataLoader shared memory

# config.json of https://huggingface.co/google/gemma-3-4b-it as published (keys that only carry
# transformers' version left out). The text config leaves heads (8), KV heads (4), head_dim (256)
# and vocab (262,208) to Gemma3TextConfig's defaults, which match the model card: 4.30B parameters
# (SigLIP 0.42B, projector 3M, language model 3.88B).
GEMMA3_4B_IT = {
    "architectures": ["Gemma3ForConditionalGeneration"], "boi_token_index": 255999, "eoi_token_index": 256000,
    "eos_token_id": [1, 106], "image_token_index": 262144, "initializer_range": 0.02, "mm_tokens_per_image": 256,
    "model_type": "gemma3", "torch_dtype": "bfloat16",
    "text_config": {"hidden_size": 2560, "intermediate_size": 10240, "model_type": "gemma3_text",
                    "num_hidden_layers": 34, "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
                    "sliding_window": 1024},
    "vision_config": {"hidden_size": 1152, "image_size": 896, "intermediate_size": 4304,
                      "model_type": "siglip_vision_model", "num_attention_heads": 16, "num_hidden_layers": 27,
                      "patch_size": 14, "vision_use_head": False},
}
# preprocessor_config.json / processor_config.json of google/gemma-3-4b-it: 896x896, 256 image tokens.
GEMMA3_4B_IT_PROCESSOR = {"image_processor": {"size": {"height": 896, "width": 896}, "image_mean": [0.5] * 3,
                                              "image_std": [0.5] * 3, "resample": 2},
                          "image_seq_length": 256}

# config.json of https://huggingface.co/Qwen/Qwen2.5-VL-3B-Instruct as published (text keys at the
# top level, the legacy layout Qwen2_5_VLConfig still reads): 3.75B parameters (ViT 0.67B, LM 3.09B,
# tied embeddings).
QWEN2_5_VL_3B_INSTRUCT = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"], "attention_dropout": 0.0, "bos_token_id": 151643,
    "eos_token_id": 151645, "vision_start_token_id": 151652, "vision_end_token_id": 151653,
    "vision_token_id": 151654, "image_token_id": 151655, "video_token_id": 151656, "hidden_act": "silu",
    "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 11008, "max_position_embeddings": 128000,
    "max_window_layers": 70, "model_type": "qwen2_5_vl", "num_attention_heads": 16, "num_hidden_layers": 36,
    "num_key_value_heads": 2, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 32768,
    "tie_word_embeddings": True, "torch_dtype": "bfloat16", "use_cache": True, "use_sliding_window": False,
    "vision_config": {"depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420,
                      "num_heads": 16, "in_chans": 3, "out_hidden_size": 2048, "patch_size": 14,
                      "spatial_merge_size": 2, "spatial_patch_size": 14, "window_size": 112,
                      "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2, "temporal_patch_size": 2},
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}, "vocab_size": 151936,
}
# preprocessor_config.json of Qwen/Qwen2.5-VL-3B-Instruct: min_pixels 3136, max_pixels 12845056
# (transformers 5 keeps them as size.shortest_edge / size.longest_edge).
QWEN2_5_VL_PROCESSOR = {"image_processor": {"size": {"shortest_edge": 3136, "longest_edge": 12845056}}}


@dataclass(frozen=True)
class BenchModel:
    """One benchmarked architecture: where its numbers come from and how the project loads it."""

    hub_id: str
    config_class: str  # the transformers config class the published dict is read with
    config: Dict[str, Any]
    processor: Dict[str, Any]  # overlay on the tiny build's processor_config.json
    model_group: str  # conf/model/<group>.yaml for the real model ...
    tiny_group: str  # ... and for its tiny twin (whose tokenizer/processor the benchmark reuses)
    params: float  # parameters of the published model: a build that differs has read its config wrong
    mode_overrides: Dict[str, Tuple[str, ...]] = field(default_factory=dict)


MODELS: Dict[str, BenchModel] = {
    "gemma3": BenchModel("google/gemma-3-4b-it", "Gemma3Config", GEMMA3_4B_IT, GEMMA3_4B_IT_PROCESSOR,
                         "gemma3", "tiny_gemma3", params=4.300e9,
                         # Full SFT of the 4B needs it on one GPU at larger batches (conf/parallel).
                         mode_overrides={"full": ("parallel.activation_checkpointing=true",)}),
    "qwen2_5_vl": BenchModel("Qwen/Qwen2.5-VL-3B-Instruct", "Qwen2_5_VLConfig", QWEN2_5_VL_3B_INSTRUCT,
                             QWEN2_5_VL_PROCESSOR, "qwen2_5_vl", "tiny_qwen2_5_vl", params=3.755e9),
}


@dataclass
class Row:
    """One (model, mode) result; ``error`` set when the run did not finish."""

    model: str
    mode: str
    hub_id: str
    steps: int = 0  # measured steps (after warm-up)
    tokens_per_s: Optional[float] = None
    tflops: Optional[float] = None  # per device, vision tower included
    mfu: Optional[float] = None  # fraction of the device's dense bf16 peak
    peak_memory_gb: Optional[float] = None
    step_time_s: Optional[float] = None
    tokens_per_step: Optional[float] = None
    image_token_share: Optional[float] = None
    seconds: Optional[float] = None  # wall time of the whole run, model loading included
    error: Optional[str] = None


# ------------------------------------------------------------------------------------ checkpoint
def _deep_merge(base: Dict[str, Any], overlay: Dict[str, Any]) -> Dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in overlay.items():
        out[key] = _deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _token_ids(tiny_config: Dict[str, Any], published: Dict[str, Any]) -> Dict[str, Any]:
    """The tiny config's special-token ids (they match the tokenizer), laid out like ``published``.

    A published file without a text_config (Qwen2.5-VL's legacy layout) keeps its text keys at the
    top level: a text_config holding only token ids would replace all of them by defaults.
    """
    ids: Dict[str, Any] = {k: v for k, v in tiny_config.items() if TOKEN_ID_KEY.search(k)}
    text = {k: v for k, v in (tiny_config.get("text_config") or {}).items() if TOKEN_ID_KEY.search(k)}
    if "text_config" in published:
        return {**ids, "text_config": text} if text else ids
    return {**ids, **text}


def published_config(spec: "BenchModel", tiny_config: Dict[str, Any]) -> Any:
    """The published architecture as a transformers config, with the tiny tokenizer's token ids."""
    import transformers

    merged = _deep_merge(spec.config, _token_ids(tiny_config, spec.config))
    return getattr(transformers, spec.config_class).from_dict(merged)


def build_checkpoint(spec: BenchModel, tiny_dir: Path, out_dir: Path, tiny: bool, dtype: str) -> Path:
    """Random weights from the published config (or the tiny one) + the tiny processor, saved like a hub repo."""
    import torch
    import transformers

    tiny_config = json.loads((tiny_dir / "config.json").read_text())
    if tiny:
        config, processor_overlay = getattr(transformers, spec.config_class).from_dict(tiny_config), {}
    else:  # the published architecture, with the token ids of the tokenizer it is paired with
        config, processor_overlay = published_config(spec, tiny_config), spec.processor
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):  # initialised where it trains: seconds on a GPU for 4B parameters
        model = transformers.AutoModelForImageTextToText.from_config(config, dtype=getattr(torch, dtype))
    params = model.num_parameters()
    if not tiny and spec.params and abs(params - spec.params) > 0.01 * spec.params:  # a config key read wrong
        raise ValueError(f"{spec.hub_id} built with {params / 1e9:.2f}B parameters, expected {spec.params / 1e9:.2f}B")
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    del model
    write_processor(tiny_dir, out_dir, processor_overlay)
    _free_device_memory()
    return out_dir


def write_processor(tiny_dir: Path, out_dir: Path, overlay: Dict[str, Any]) -> None:
    """The tiny build's tokenizer and chat template, its processor config with ``overlay`` on top."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for item in tiny_dir.iterdir():
        if item.is_file() and item.name not in NOT_COPIED:
            shutil.copy2(item, out_dir / item.name)
    processor = json.loads((tiny_dir / "processor_config.json").read_text())
    (out_dir / "processor_config.json").write_text(json.dumps(_deep_merge(processor, overlay), indent=2))


def _free_device_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


# ------------------------------------------------------------------------------------ runs
def compose(overrides: Sequence[str]) -> Any:
    from vlm_sweep.inspect import compose_config

    return compose_config(list(overrides), ROOT / "conf")


def run_overrides(spec: BenchModel, mode: str, checkpoint: Path, args: argparse.Namespace, data_dir: Path) -> List[str]:
    """The Hydra overrides of one benchmark run: the real recipe with tracking/checkpoints/eval off."""
    width, height = args.image_size
    steps = args.steps
    precision = "auto" if args.tiny else "bf16"
    out = [
        f"model={spec.tiny_group if args.tiny else spec.model_group}", "model.tiny_recipe=null",
        f"model.pretrained_model_name_or_path={checkpoint}",
        "dataset=synthetic_receipts", f"dataset.path={data_dir}", f"+dataset.synthetic.image_size=[{width},{height}]",
        f"dataset.synthetic.num_train={max(4 * args.batch_size, 16)}", "dataset.synthetic.num_validation=2",
        "dataset.synthetic.num_test=2", f"dataset.max_length={args.max_length}", "dataset.val_split=null",
        "dataset.preflight_samples=0", "freeze=vision_frozen", "parallel=single",
        f"parallel.mixed_precision={precision}", f"step_scheduler.max_steps={steps}",
        f"step_scheduler.global_batch_size={args.batch_size}",
        f"step_scheduler.micro_batch_size={args.micro_batch_size}", "step_scheduler.log_every_steps=1",
        f"step_scheduler.val_every_steps={steps}", f"step_scheduler.ckpt_every_steps={steps}",
        "tracking=none", "checkpoint.enabled=false", "eval=none", "scheduler=constant",
        *MODE_OVERRIDES[mode], *spec.mode_overrides.get(mode, ()),
    ]
    if args.peak_tflops:
        out.append(f"tracking.peak_tflops={args.peak_tflops}")
    return out + list(args.overrides)


def summarise(rows: List[Dict[str, Any]], warmup: int, row: Row) -> Row:
    """Time-weighted means over the steps after ``warmup`` (every step is logged: one window each)."""
    from vlm_sweep.records import training_seconds

    measured = [r for r in rows if isinstance(r.get("step"), int) and r["step"] > warmup
                and r.get("tokens_per_s")]
    if not measured:
        raise RuntimeError(f"no step after the {warmup} warm-up steps was logged")
    seconds = [training_seconds([r]) or 0.0 for r in measured]
    total = sum(seconds)
    tokens = [r["image_tokens"] + r["text_tokens"] for r in measured]

    def weighted(key: str) -> Optional[float]:
        if any(r.get(key) is None for r in measured):
            return None
        return sum(r[key] * s for r, s in zip(measured, seconds)) / total

    row.steps = len(measured)
    row.tokens_per_s = sum(tokens) / total
    row.tflops, row.mfu = weighted("tflops"), weighted("mfu")
    row.peak_memory_gb = max(r["peak_memory_gb"] for r in measured)
    row.step_time_s = total / len(measured)
    row.tokens_per_step = sum(tokens) / len(measured)
    row.image_token_share = sum(r["image_tokens"] for r in measured) / max(sum(tokens), 1)
    return row


def run_one(spec: BenchModel, name: str, mode: str, checkpoint: Path, args: argparse.Namespace,
            work: Path) -> Row:
    """Train one (model, mode) through vlm_sweep.train.run and read its metrics log."""
    from vlm_sweep.config.validate import validate_config
    from vlm_sweep.train import run

    row = Row(name, mode, spec.hub_id)
    cfg = compose(run_overrides(spec, mode, checkpoint, args, work / "data" / "receipts"))
    validate_config(cfg)
    run_dir = work / "runs" / f"{name}_{mode}"
    shutil.rmtree(run_dir, ignore_errors=True)
    _free_device_memory()
    started = time.perf_counter()
    result = run(cfg, run_dir)
    row.seconds = time.perf_counter() - started
    if result.status != "FINISHED":
        raise RuntimeError(f"run ended {result.status} at step {result.step}")
    from vlm_sweep.records import read_metrics

    return summarise(read_metrics(run_dir), min(args.warmup, args.steps - 1), row)


def _one_line(err: BaseException) -> str:
    """The error in one line; for one re-raised from a DataLoader worker, the worker's own."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    if not lines:
        return type(err).__name__
    if lines[0].startswith("Caught ") and "Original Traceback" in str(err):
        return re.sub(r"^(?:\w+\.)+(?=\w+:)", "", lines[-1])[:300]  # "BadRecordError: ...", no module path
    return f"{type(err).__name__}: {' '.join(lines)[:300]}"


def bench_model(name: str, args: argparse.Namespace, work: Path, deadline: float) -> List[Row]:
    """Build one model's checkpoint, run each mode on it; errors (OOM, ...) become rows."""
    from vlm_sweep.models.load import resolve_source

    spec = MODELS[name]
    if time.monotonic() > deadline:
        return [Row(name, mode, spec.hub_id, error="skipped: --time-limit reached") for mode in args.modes]
    checkpoint = work / "checkpoints" / name
    rows: List[Row] = []
    try:
        print(f"[{name}] building {'tiny ' if args.tiny else ''}{spec.hub_id} with random weights", flush=True)
        tiny_dir = Path(resolve_source(compose([f"model={spec.tiny_group}"]).model))  # built once, cached
        build_checkpoint(spec, tiny_dir, checkpoint, args.tiny, "float32" if args.tiny else "bfloat16")
    except Exception as err:
        rows = [Row(name, mode, spec.hub_id, error=f"build failed: {_one_line(err)}") for mode in args.modes]
    for mode in args.modes if not rows else ():
        if time.monotonic() > deadline:
            rows.append(Row(name, mode, spec.hub_id, error="skipped: --time-limit reached"))
            continue
        print(f"[{name}] {mode}: {args.steps} steps", flush=True)
        try:
            rows.append(run_one(spec, name, mode, checkpoint, args, work))
        except Exception as err:  # report it, go on with the next run
            rows.append(Row(name, mode, spec.hub_id, error=_one_line(err)))
        finally:  # the next run's recipe makes its Accelerator afresh (train._make_accelerator)
            _free_device_memory()
    shutil.rmtree(checkpoint, ignore_errors=True)
    _free_device_memory()
    return rows


# ------------------------------------------------------------------------------------ output
COLUMNS = (("model", "model"), ("mode", "mode"), ("tokens/s", "tokens_per_s"), ("TFLOP/s", "tflops"),
           ("MFU", "mfu"), ("peak mem GB", "peak_memory_gb"), ("step s", "step_time_s"),
           ("tokens/step", "tokens_per_step"), ("image tok", "image_token_share"))


def _cell(row: Row, key: str) -> str:
    value = getattr(row, key)
    if value is None:
        return "n/a"
    if key in ("mfu", "image_token_share"):
        return f"{100 * value:.1f}%"
    if key in ("tokens_per_s", "tokens_per_step"):
        return f"{value:,.0f}"
    if key in ("tflops", "peak_memory_gb"):
        return f"{value:.1f}" if value >= 1 else f"{value:.3g}"
    if key == "step_time_s":
        return f"{value:.3f}"
    return str(value)


def render_table(rows: Sequence[Row]) -> str:
    """Aligned Markdown; a failed run's row carries its error after the model and mode."""
    header = [title for title, _ in COLUMNS]
    cells = [[_cell(row, key) for _, key in COLUMNS] for row in rows if not row.error]
    cells += [[row.model, row.mode] + [""] * (len(COLUMNS) - 2) for row in rows if row.error]
    widths = [max(len(line[i]) for line in [header, *cells]) for i in range(len(COLUMNS))]
    line = lambda values: "| " + " | ".join(c.ljust(w) for c, w in zip(values, widths)) + " |"  # noqa: E731
    out = [line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    for row in rows:
        if row.error:
            out.append(f"| {row.model.ljust(widths[0])} | {row.mode.ljust(widths[1])} | ERROR {row.error} |")
        else:
            out.append(line([_cell(row, key) for _, key in COLUMNS]))
    return "\n".join(out)


def default_workdir() -> Path:
    """A temp dir in RAM (/dev/shm) when it has room for a checkpoint: an 8.6 GB save and two loads
    per model would otherwise cost a minute or more of the time limit on a slow disk."""
    shm = Path("/dev/shm")
    try:
        roomy = shm.is_dir() and shutil.disk_usage(shm).free >= SHM_NEEDED
    except OSError:
        roomy = False
    return Path(tempfile.mkdtemp(prefix="vlm_sweep_gpu_bench_", dir=shm if roomy else None))


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU ({os.cpu_count()} cores)"


# ------------------------------------------------------------------------------------ main
def _size(text: str) -> Tuple[int, int]:
    match = re.fullmatch(r"(\d+)x(\d+)", text)
    if not match:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT, e.g. 864x1152, got {text!r}")
    return int(match.group(1)), int(match.group(2))


def _names(known: Sequence[str]):
    def parse(text: str) -> List[str]:
        names = [n.strip() for n in text.split(",") if n.strip()]
        unknown = [n for n in names if n not in known]
        if unknown or not names:
            raise argparse.ArgumentTypeError(f"unknown {unknown or text!r}; choose from {', '.join(known)}")
        return names
    return parse


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=_names(tuple(MODELS)), default=list(MODELS),
                        help=f"comma-separated, from {', '.join(MODELS)} (default: all)")
    parser.add_argument("--modes", type=_names(MODES), default=list(MODES), help="lora,full (default: both)")
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per run (default 30)")
    parser.add_argument("--warmup", type=int, default=5, help="first steps left out of the means (default 5)")
    parser.add_argument("--batch-size", type=int, default=8, help="global batch, CORD recipe's 8 (default)")
    parser.add_argument("--micro-batch-size", type=int, default=4, help="per forward (default 4)")
    parser.add_argument("--image-size", type=_size, default=None,
                        help="receipt images WIDTHxHEIGHT (default 864x1152, ~1 MP like a phone photo; "
                             "--tiny: 256x384)")
    parser.add_argument("--max-length", type=int, default=None, help="dataset.max_length (default 2048; --tiny 512)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="device peak for MFU (default: looked up by GPU name; none on a CPU)")
    parser.add_argument("--tiny", action="store_true",
                        help="tiny models (on a CPU, or the GPU if any): the same code path, in seconds")
    parser.add_argument("--out", type=Path, default=None, help="also write the table as JSON here")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="scratch dir, kept but for the checkpoints (default: a temp dir, in /dev/shm "
                             "if it has 24 GB free, removed)")
    parser.add_argument("--time-limit", type=float, default=7.5,
                        help="minutes; runs not started by then get a 'skipped' row (default 7.5)")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run (e.g. freeze=none)")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")
    if args.batch_size % args.micro_batch_size:
        parser.error("--batch-size must be a multiple of --micro-batch-size")
    args.image_size = args.image_size or ((256, 384) if args.tiny else (864, 1152))
    args.max_length = args.max_length or (512 if args.tiny else 2048)
    return args


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here comes from the hub: no lookups, no retries
    import torch

    if not args.tiny and not torch.cuda.is_available():
        print("error: no GPU here; run with --tiny for the CPU version of the same benchmark", file=sys.stderr)
        return 2
    from vlm_sweep.console import silence_known_noise

    silence_known_noise()
    started = time.monotonic()
    deadline = started + 60 * args.time_limit
    work = args.workdir or default_workdir()
    rows: List[Row] = []
    try:
        for name in args.models:
            rows += bench_model(name, args, work, deadline)
            write_report(args, rows, started)  # after each model: a run killed later keeps these rows
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    print(f"\n{device_name()}, {'tiny models' if args.tiny else 'bf16'}, global batch {args.batch_size} "
          f"(micro {args.micro_batch_size}), images {args.image_size[0]}x{args.image_size[1]}, "
          f"means over steps {min(args.warmup, args.steps - 1) + 1}-{args.steps}, "
          f"{time.monotonic() - started:.0f} s in all")
    print(render_table(rows))
    if args.out:
        print(f"json: {args.out}")
    return 1 if any(r.error for r in rows) else 0


def write_report(args: argparse.Namespace, rows: Sequence[Row], started: float) -> None:
    """The rows so far as JSON at ``--out`` (rewritten whole, atomically)."""
    if not args.out:
        return
    import torch

    report = {"device": device_name(), "torch": torch.__version__, "tiny": args.tiny, "steps": args.steps,
              "warmup": args.warmup, "global_batch_size": args.batch_size, "micro_batch_size": args.micro_batch_size,
              "image_size": list(args.image_size), "max_length": args.max_length, "overrides": list(args.overrides),
              "seconds": time.monotonic() - started, "rows": [asdict(r) for r in rows]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    partial = args.out.with_name(args.out.name + ".partial")
    partial.write_text(json.dumps(report, indent=2) + "\n")
    partial.replace(args.out)


if __name__ == "__main__":
    sys.exit(main())
