"""Typed schemas for every config group.

Hydra merges each group's YAML into these dataclasses, so a misspelled key or a
wrong type fails at composition time. Value checks (ranges, choices, cross-field
rules) live in ``validate.py`` and run before any model is loaded.

This module must stay free of torch/transformers/mlflow imports: ``launch.py
--cfg job`` imports it and has to be fast.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from omegaconf import MISSING

from vlm_sweep.rundir import CHECKPOINTS


@dataclass
class PathsConfig:
    """Where run products and local artefacts live."""

    # Root for run products and the embedded MLflow store (relative to the launch dir).
    output_root: str = "outputs"
    # Tiny models and generated data sets are built here once and reused.
    cache_dir: str = "${oc.env:VLM_SWEEP_CACHE,${oc.env:HOME,/tmp}/.cache/vlm_sweep}"


@dataclass
class ModelConfig:
    """A model is a registry family plus where its weights come from."""

    name: str = MISSING
    # Key into vlm_sweep.models.registry.MODEL_FAMILIES.
    family: str = MISSING
    # Hub id (google/gemma-3-4b-it) or a local directory.
    pretrained_model_name_or_path: str = MISSING
    # If set, the local directory above is built once by this tiny recipe
    # (vlm_sweep.models.tiny) before loading it through from_pretrained.
    tiny_recipe: Optional[str] = None
    revision: Optional[str] = None
    # auto | float32 | bfloat16 | float16
    dtype: str = "auto"
    # eager | sdpa | flash_attention_2 | null (transformers default)
    attn_implementation: Optional[str] = "sdpa"
    trust_remote_code: bool = False


@dataclass
class DatasetConfig:
    """A data set: where it is, how a record becomes a conversation, and budgets."""

    name: str = MISSING
    # A data set module's name: vlm_sweep.data.sets.<format> (cord_v2, ...).
    format: str = MISSING
    # Hub id (naver-clova-ix/cord-v2) or a local directory in the same schema.
    path: str = MISSING
    subset: Optional[str] = None
    train_split: str = "train"
    val_split: Optional[str] = "validation"
    # The split that evaluation CLIs use by default.
    split: str = "test"
    prompt: str = "Describe this image."
    # If set, `path` is generated once by the format's fixture writer, with these keyword arguments.
    synthetic: Optional[Dict[str, Any]] = None
    # Token budget per sample; longer samples are bad records (never cut mid-image).
    max_length: int = 2048
    # error: stop on the first bad record (naming it). skip: drop it and count.
    on_bad_record: str = "error"
    # Under skip: stop with an error when fewer than this fraction of the records read are usable.
    min_usable_fraction: float = 0.5
    # Records checked (media, roles, lengths, modalities) before training starts; 0: off.
    # The whole data set: python -m vlm_sweep.inspect <overrides>.
    preflight_samples: int = 64
    max_train_samples: Optional[int] = None
    max_val_samples: Optional[int] = None
    # Put samples of similar length into the same batch to cut padding (batches shuffled per epoch).
    group_by_length: bool = True
    # Data-loading worker processes; null: one per spare core (up to 4), 0: on the training thread.
    num_workers: Optional[int] = None
    # Encoded records kept per data-loading process (MiB) so later epochs skip templating,
    # tokenising and image processing; 0: encode every time.
    feature_cache_mb: float = 1024.0
    # Carve a validation split out of train (seeded) when the source has none (e.g. raven).
    carve_val_fraction: Optional[float] = None
    carve_seed: int = 0
    # Videos: relative paths in records resolve against this directory.
    video_root_path: Optional[str] = None
    # Frames per video, sampled uniformly; or sample at `fps` frames per second instead.
    num_frames: int = 10
    fps: Optional[float] = None
    # Image budgets. Processors that size by pixel count (Qwen) get min/max_pixels;
    # every image is first shrunk so its longer side is at most max_image_side.
    min_pixels: Optional[int] = None
    max_pixels: Optional[int] = None
    max_image_side: Optional[int] = None
    # Pack each micro-batch's conversations into rows (no padding between them; each attends only
    # to itself, position ids restart per conversation): same conversations per step, same loss.
    packing: bool = False
    # Tokens per packed row (image/video tokens included), at least max_length; null: the whole
    # micro-batch in one row.
    pack_length: Optional[int] = None


@dataclass
class PeftConfig:
    """LoRA (via the peft library) or none."""

    method: str = "none"  # a key of training.peft_methods.PEFT_METHODS: none | lora | dora
    dim: int = 8
    alpha: int = 32
    dropout: float = 0.0
    # True: every nn.Linear is a candidate. False: the language model's linears.
    match_all_linear: bool = False
    # Glob patterns over full module names; empty means "all candidates".
    target_modules: List[str] = field(default_factory=list)
    exclude_modules: List[str] = field(default_factory=list)


@dataclass
class FreezeConfig:
    """Which components' base weights are frozen.

    null means the method's default: trainable for full fine-tuning, frozen
    under LoRA. false under LoRA trains that component's base weights fully
    (the Nemotron guide's "LoRA on the LM, vision fully trained" setting).
    """

    freeze_embeddings: Optional[bool] = None
    freeze_vision_tower: Optional[bool] = None
    # Megatron Bridge's name for freeze_vision_tower (set one or the other).
    freeze_vision_model: Optional[bool] = None
    freeze_audio_tower: Optional[bool] = None
    freeze_vision_projection: Optional[bool] = None
    freeze_language_model: Optional[bool] = None


@dataclass
class ParallelConfig:
    """Data-parallel strategy; processes come from torchrun/SLURM."""

    strategy: str = "single"  # single | ddp | fsdp (FSDP2: parameters sharded across ranks)
    # auto: bf16 on a bf16 GPU or a native-bf16 CPU for a model >= 128 wide (training.precision). Or: no (= fp32) | bf16 | fp16.
    mixed_precision: str = "auto"
    backend: Optional[str] = None  # null: nccl on GPU, gloo on CPU
    # DDP: tolerate parameters without gradients in a step (a rank whose batch has no image).
    # Costs a graph traversal per step. null: on only when a part outside the language model trains
    # (vision tower, projector, audio tower: what a batch can leave unused); true/false force it.
    find_unused_parameters: Optional[bool] = None
    # Recompute each block's activations in the backward instead of keeping them: less memory
    # (the 12B seq-4096/8192 and 4B full-SFT recipes need it on one GPU), ~30% more compute.
    activation_checkpointing: bool = False


@dataclass
class CheckpointConfig:
    enabled: bool = True
    # Relative to the run directory unless absolute.
    dir: str = CHECKPOINTS
    model_save_format: str = "safetensors"  # safetensors | torch_save
    save_consolidated: bool = False
    keep_last: int = 2
    # auto: continue from <dir>/LATEST if present. none: start fresh. Or a path.
    resume: str = "auto"
    # Keep a BEST pointer to the checkpoint with the best value of this metric
    # ("val_loss" or "eval/<metric>", e.g. eval/ted_accuracy); null: no BEST.
    best_metric: Optional[str] = None
    best_mode: str = "max"  # max | min


@dataclass
class OptimizerConfig:
    name: str = "adamw"
    lr: float = 5e-4
    weight_decay: float = 0.0
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    # Gradient clipping by global norm; null disables it.
    max_grad_norm: Optional[float] = 1.0


@dataclass
class SchedulerConfig:
    name: str = "cosine"  # cosine | constant
    warmup_steps: int = 0
    # Cosine decays from optimizer.lr to min_lr.
    min_lr: float = 0.0


@dataclass
class StepSchedulerConfig:
    max_steps: int = 100
    global_batch_size: int = 8
    micro_batch_size: int = 2
    log_every_steps: int = 1
    val_every_steps: int = 50
    ckpt_every_steps: int = 100
    # Validation batches per evaluation; null runs the whole split.
    max_val_batches: Optional[int] = None


@dataclass
class EvalConfig:
    """Generation-based task metrics (e.g. CORD tree-edit accuracy) during training."""

    # Generate and score every N steps (and at the end); null: never during training.
    every_steps: Optional[int] = None
    # Validation records scored each time (the first N of the split).
    num_samples: int = 16
    max_new_tokens: int = 256
    batch_size: int = 4


@dataclass
class TrackingConfig:
    backend: str = "mlflow"  # mlflow | none
    # null: $MLFLOW_TRACKING_URI, else sqlite:///<outputs>/mlflow.db
    uri: Optional[str] = None
    experiment_name: str = "${experiment_name}"
    run_name: Optional[str] = None
    # Metrics are buffered and sent in one batch this often (in steps).
    flush_every_steps: int = 10
    # While the store does not answer, training goes on; delivery is retried this often (seconds).
    retry_every_s: float = 30.0
    # Dense bf16 peak TFLOP/s of one device, for the logged `mfu`; null: looked up by GPU name
    # (H100/H200 989, A100 312, ...); on a CPU no mfu is logged unless this is set.
    peak_tflops: Optional[float] = None
    tags: Dict[str, str] = field(default_factory=dict)


@dataclass
class RunConfig:
    """The whole composed run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    freeze: FreezeConfig = field(default_factory=FreezeConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    step_scheduler: StepSchedulerConfig = field(default_factory=StepSchedulerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    experiment_name: str = "default"
    seed: int = 42
    # What a job returns to sweepers (Optuna) and the report ranks by: loss, val_loss, eval/<metric>.
    objective_metric: str = "val_loss"
    objective_mode: str = "min"  # min | max


def register_configs() -> None:
    """Put the run schema in Hydra's ConfigStore as ``run_schema`` (idempotent).

    conf/config.yaml lists it first in its defaults, so every group option file
    merges into a typed node: unknown keys and wrong types fail at composition.
    """
    from hydra.core.config_store import ConfigStore

    from omegaconf import OmegaConf

    from vlm_sweep.sweep.launchers import register_launcher_schemas

    ConfigStore.instance().store(name="run_schema", node=RunConfig)
    register_launcher_schemas()
    if not OmegaConf.has_resolver("optuna_direction"):
        OmegaConf.register_new_resolver(
            "optuna_direction", lambda mode: {"min": "minimize", "max": "maximize"}[mode])
