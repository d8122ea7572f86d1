"""What every benchmark process shares: the composed config, the model sizes, the parts of a run.

Each measured variant runs in its own process (scripts/bench/throughput.py, memory.py), so
one variant's threads, allocator and Accelerate state never touch another's; they all build
the same model, LoRA, optimizer and batches from the same config and seed.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

ROOT = Path(__file__).resolve().parents[2]
# Tiny models and data are built once into the repo-local cache the tests use.
os.environ.setdefault("VLM_SWEEP_CACHE", str(ROOT / ".cache" / "vlm_sweep"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One compute thread per process, as `make demo` runs on this 2-core machine.
os.environ.setdefault("OMP_NUM_THREADS", "1")
CACHE = Path(os.environ["VLM_SWEEP_CACHE"])

# The run exactly as launch.py composes it, minus what is not the training loop: no tracking
# store, no checkpoint or validation due, no generation eval, no pre-flight pass.
LOOP_OVERRIDES = [
    "tracking=none",
    "checkpoint.enabled=false",
    "eval=none",
    "dataset.preflight_samples=0",
    "step_scheduler.val_every_steps=1000000",
    "step_scheduler.ckpt_every_steps=1000000",
    # fp32 like the bare loop and transformers.Trainer, on every size (auto would pick bf16 for the 30M model on
    # a CPU with AVX512-BF16; the precision table compares fp32, bf16 and auto).
    "parallel.mixed_precision=no",
]

# ~30M-parameter Gemma 3 language model (the tiny one's vision tower, tokenizer and processor).
GEMMA3_30M_TEXT = {
    "hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 8,
    "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 64, "query_pre_attn_scalar": 64,
    "sliding_window": 512,
    "layer_types": ["sliding_attention"] * 5 + ["full_attention"] + ["sliding_attention"] * 2,
}
# Every Gemma 3 has this vocabulary; the tiny tokenizer's ids (~2k) all lie inside it. Size
# '30m_vocab' (opt-in, --sizes 30m_vocab) is the 30M model with it: where the LM head is most of the
# step, as for real Gemma 3 checkpoints, and where a loss that projects only labelled positions pays.
GEMMA3_VOCAB = 262_144
BUILD_MARKER = "bench_build.json"
BUILD_VERSION = 1
SIZES = ("tiny", "30m", "30m_vocab")


def compose(overrides: Sequence[str] = ()) -> Any:
    """The run config as launch.py composes it (without the hydra node)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from vlm_sweep.config.schema import register_configs

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=list(overrides))


def build_gemma3_30m(output_dir: Path, vocab_size: Optional[int] = None) -> Path:
    """A ~30M Gemma 3 built like tiny_gemma3 (same recipe, wider/deeper text config), once.

    models.tiny.gemma3.build has fixed sizes, so the config is widened here from the tiny build's own
    Gemma3Config and saved with its processor; the run then loads it through the normal path.
    Called by the parent process before it starts the workers that load it.
    """
    text = {**GEMMA3_30M_TEXT, **({"vocab_size": vocab_size} if vocab_size else {})}
    marker = output_dir / BUILD_MARKER
    if marker.is_file() and json.loads(marker.read_text()) == {"version": BUILD_VERSION, "text": text}:
        return output_dir
    from transformers import AutoConfig, AutoProcessor, Gemma3Config, Gemma3ForConditionalGeneration, GenerationConfig

    from vlm_sweep.models.tiny import common as tiny

    source = tiny.build_tiny_model("gemma3", CACHE / "models" / "tiny_gemma3")
    data = AutoConfig.from_pretrained(source).to_dict()
    data["text_config"] = {**data["text_config"], **text}
    config = Gemma3Config.from_dict(data)

    def trained_projector(model: Any) -> None:  # as models.tiny.gemma3.build does
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(std=config.initializer_range)
        tiny.pretrained_like_embeddings(model)

    model = tiny.init_model(Gemma3ForConditionalGeneration, config, trained_projector)
    model.generation_config = GenerationConfig.from_pretrained(source)
    tmp = output_dir.parent / f".{output_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        model.save_pretrained(tmp)
        AutoProcessor.from_pretrained(source).save_pretrained(tmp)
        (tmp / BUILD_MARKER).write_text(json.dumps({"version": BUILD_VERSION, "text": text}))
        if output_dir.exists():  # an older build (the parent builds before any worker reads it)
            shutil.rmtree(output_dir)
        os.rename(tmp, output_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return output_dir


def size_overrides(size: str) -> List[str]:
    """Config overrides that select a benchmark model size (one of SIZES)."""
    if size == "tiny":
        return ["model=tiny_gemma3"]
    if size in ("30m", "30m_vocab"):
        name = f"bench_gemma3_{size}"
        path = build_gemma3_30m(CACHE / "models" / name, GEMMA3_VOCAB if size == "30m_vocab" else None)
        return ["model=tiny_gemma3", f"model.name={name}", f"model.pretrained_model_name_or_path={path}",
                "model.tiny_recipe=null"]
    raise ValueError(f"unknown size {size!r} ({', '.join(SIZES)})")


def loop_config(size: str, max_steps: int, extra: Sequence[str] = ()) -> Any:
    return compose([*size_overrides(size), *LOOP_OVERRIDES, f"step_scheduler.max_steps={max_steps}", *extra])


@dataclass
class Parts:
    """A run's parts built without an Accelerator (for the bare loop and the HF/TRL trainers)."""

    model: Any
    processor: Any
    optimizer: Any
    scheduler: Any
    train_loader: Any  # the run's own loader: its sampler gives the record order
    dataset: Any
    collator: Any
    micro: int
    accum: int

    def record_order(self, micro_batches: int) -> List[int]:
        """Indices of the records the run's loader reads for its first ``micro_batches`` batches."""
        return list(itertools.islice(iter(self.train_loader.sampler), micro_batches * self.micro))

    def collate_in_order(self, micro_batches: int) -> List[Dict[str, Any]]:
        """Those micro-batches, collated here, up front (what the loader would hand the Trainer)."""
        order = self.record_order(micro_batches)
        batches = [self.collator([self.dataset[j] for j in order[i:i + self.micro]])
                   for i in range(0, len(order), self.micro)]
        if any("input_ids" not in b for b in batches):
            raise RuntimeError("the benchmark needs a data set without skipped records")
        return batches


def build_parts(cfg: Any) -> Parts:
    """vlm_sweep.train._build's steps in its order (same seed, same RNG draws), minus Accelerate."""
    from accelerate.utils import set_seed

    from vlm_sweep.data.collate import VLMCollator
    from vlm_sweep.data.datasets import build_datasets
    from vlm_sweep.data.loaders import build_loaders
    from vlm_sweep.models.load import load_model_and_processor
    from vlm_sweep.models.registry import get_family
    from vlm_sweep.train import enable_activation_checkpointing
    from vlm_sweep.training.freeze import apply_freeze
    from vlm_sweep.training.peft_methods import apply_peft
    from vlm_sweep.training.optim import build_optimizer, build_scheduler

    set_seed(cfg.seed)
    family = get_family(cfg.model.family)
    model, processor = load_model_and_processor(cfg.model)
    if cfg.parallel.activation_checkpointing:
        enable_activation_checkpointing(model)
    model = apply_peft(model, family, cfg.peft, cfg.freeze)
    apply_freeze(model, family, cfg.freeze)
    datasets = build_datasets(cfg.dataset)
    collator = VLMCollator.for_dataset(processor, cfg.dataset)
    train_loader, _ = build_loaders(cfg.dataset, cfg.step_scheduler, datasets, collator, seed=cfg.seed,
                                    rank=0, world_size=1, shard_validation=True, pin_memory=False)
    optimizer = build_optimizer(model, cfg.optimizer)
    scheduler = build_scheduler(optimizer, cfg.scheduler, cfg.step_scheduler.max_steps, cfg.optimizer.lr)
    steps = cfg.step_scheduler
    return Parts(model, processor, optimizer, scheduler, train_loader, datasets["train"], collator,
                 micro=steps.micro_batch_size, accum=steps.global_batch_size // steps.micro_batch_size)


def step_tokens(micro: Sequence[Dict[str, Any]]) -> int:
    """Real (non-padding) tokens of one optimizer step, as the Trainer counts them."""
    return sum(int(b["attention_mask"].sum()) for b in micro)


def cpu_seconds() -> float:
    """CPU time of this process and its live children (DataLoader workers), where /proc tells."""
    import time

    total = time.process_time()
    me, tick = str(os.getpid()), os.sysconf("SC_CLK_TCK")
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else ():
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[1] == me:  # fields after the name: state, ppid, ..., utime (12), stime (13)
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


# ------------------------------------------------------------------ worker <-> parent protocol
PREFIX = "@@bench "


class Channel:
    """JSON lines to the parent on a private copy of stdout; everything else printed goes to stderr."""

    def __init__(self) -> None:
        self._out = os.fdopen(os.dup(1), "w", buffering=1)
        os.dup2(2, 1)

    def send(self, **message: Any) -> None:
        self._out.write(PREFIX + json.dumps(message) + "\n")
        self._out.flush()

    def wait(self) -> str:
        """The parent's next command ('run' or 'quit'; a closed pipe means quit)."""
        return sys.stdin.readline().strip() or "quit"


class Pacer:
    """Cuts a training loop into warm-up + interleaved timed rounds, driven by the parent.

    The loop calls ``step_done`` after every optimizer step; at a round boundary the pacer reports
    the round's wall time and tokens, then blocks until the parent says run the next round
    (the loop is built for exactly warmup + steps x rounds steps, so it ends on its own).
    """

    def __init__(self, channel: Channel, warmup: int, steps: int, rounds: int) -> None:
        import time

        self._clock, self._main_cpu = time.perf_counter, time.process_time
        self.main_cpu_started = 0.0
        self.channel, self.warmup, self.steps, self.rounds = channel, warmup, steps, rounds
        self.done, self.tokens, self.started, self.cpu_started = 0, 0, 0.0, 0.0
        self.first_loss: Optional[float] = None
        self._profile = os.environ.get("BENCH_PROFILE")  # a path: cProfile the timed rounds into it
        self._profiler: Any = None

    def step_done(self, tokens: int, loss: Any = None) -> None:
        self.done += 1
        if self.done == 1 and loss is not None:
            self.first_loss = float(loss())
        if self.done <= self.warmup:
            if self.done == self.warmup:
                self.channel.send(event="ready", first_loss=self.first_loss)
                self._resume()
            return
        self.tokens += tokens
        if (self.done - self.warmup) % self.steps == 0:
            seconds = self._clock() - self.started
            if self._profiler is not None:
                self._profiler.disable()
            self.channel.send(event="round", seconds=seconds, tokens=self.tokens, steps=self.steps,
                              cpu_seconds=cpu_seconds() - self.cpu_started,
                              main_cpu_seconds=self._main_cpu() - self.main_cpu_started)
            self.tokens = 0
            if self.done < self.warmup + self.steps * self.rounds:
                self._resume()  # after the last round the loop ends by itself
            elif self._profiler is not None:
                self._profiler.dump_stats(self._profile)

    def _resume(self) -> None:
        if self.channel.wait() != "run":
            raise SystemExit(0)
        if self._profile and self._profiler is None:
            import cProfile

            self._profiler = cProfile.Profile()
        self.cpu_started, self.main_cpu_started = cpu_seconds(), self._main_cpu()
        if self._profiler is not None:
            self._profiler.enable()
        self.started = self._clock()
