"""``make bench``: vlm_sweep's training loop side by side with the alternatives, and the memory it saves.

    make bench                              # or: .venv/bin/python scripts/benchmark.py
    .venv/bin/python scripts/benchmark.py --quick            # 2 rounds of 2 steps, small memory sizes
    .venv/bin/python scripts/benchmark.py --profile          # + cProfile of the real loop's timed steps
    .venv/bin/python scripts/benchmark.py --skip-packing     # without the packed-vs-padded comparison

Throughput, in interleaved rounds (A B C D, A B C D, ...; medians and per-round ratios, never
absolute times, since a 2-core machine shared with other work is noisy), for the tiny default
Gemma 3 and a ~30M one built locally the same way:
  (a) vlm_sweep's own loop: train._build + Trainer.fit over its DataLoader (tracking none,
      no checkpoint/validation due, no eval);
  (b) a bare PyTorch loop over the same batches, collated up front: the floor;
  (c) transformers.Trainer and (d) trl.SFTTrainer with the same model, LoRA, optimizer, schedule
      and batches;
then loop (a) on the tiny model at micro batch 8, padded (length-grouped) vs packed (dataset.packing),
and loop (a) at each size in fp32, in bf16 autocast and with mixed_precision=auto (which must be the
faster of the two, within noise).
Memory, one fresh process per variant: one training step at Gemma 3 4B widths (seq 2048, 256
labelled positions) with the old full-logits loss vs summed_token_loss; the ~30M model at seq 1024
with and without activation checkpointing (same losses).

Prints the tables and one line per check; exits 1 if a check is missed (not with --quick, whose two
rounds mean nothing, nor --profile, which slows loop (a)) or a measurement fails (TRL failing to
train this VLM is reported, not fatal).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench.common import PREFIX, ROOT, SIZES, size_overrides  # noqa: E402  (sets the thread/cache environment first)
from bench.report import Check, memory_table, paired_ratio, throughput_header, throughput_table  # noqa: E402
from bench.rounds import Outcome, Spec, WorkerError, interleave  # noqa: E402

MEMORY_WORKER = Path(__file__).resolve().parent / "bench" / "memory.py"
LOOPS = [("(a) vlm_sweep Trainer (launch.py loop)", "real"), ("(b) bare PyTorch loop, pre-collated", "bare"),
         ("(c) transformers.Trainer", "hf"), ("(d) trl.SFTTrainer", "trl")]
# (hidden, intermediate, vocab, layers, seq, labelled): Gemma 3 4B's widths; --quick: a small stand-in.
LOSS_SHAPE = {"full": (2560, 10240, 262144, 1, 2048, 256), "quick": (256, 1024, 32768, 1, 512, 64)}
# Packing vs padding (tiny, micro batch 8: a real spread of lengths per micro-batch), vlm_sweep's loop each time.
PACKING_BATCH = ["step_scheduler.micro_batch_size=8", "step_scheduler.global_batch_size=8"]
PACKING = [("(a) padded, length-grouped (the default)", "", []),
           ("(e) packed, pack_length null (one row)", "-packed", ["dataset.packing=true"]),
           ("(f) packed, pack_length 512", "-packed512", ["dataset.packing=true", "dataset.pack_length=512"])]
# Precision: vlm_sweep's loop in fp32, in bf16 autocast and as parallel.mixed_precision=auto picks (each size).
PRECISION = [("(a) fp32 (mixed_precision=no)", "-fp32", ["parallel.mixed_precision=no"]),
             ("(g) bf16 autocast (mixed_precision=bf16)", "-bf16", ["parallel.mixed_precision=bf16"]),
             ("(h) mixed_precision=auto", "-auto", ["parallel.mixed_precision=auto"])]
# auto must run within this factor of the faster of fp32 and bf16 (a wrong pick costs 0.6-0.85x here).
AUTO_PRECISION_TARGET = 0.93
# (size, seq, optimizer steps, rows) of the activation-checkpointing comparison.
CKPT_SHAPE = {"full": ("30m", 1024, 3, 1), "quick": ("tiny", 256, 2, 1)}


def parse_args(argv: List[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny model, 2 rounds of 2 steps")
    parser.add_argument("--sizes", default=None,
                        help="comma list of tiny,30m,30m_vocab (default: tiny,30m; --quick: tiny); 30m_vocab: "
                             "the 30M model with Gemma 3's real 262,144-token vocabulary (opt-in, ~2x slower)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default: tiny 7, 30m 5)")
    parser.add_argument("--skip-memory", action="store_true", help="throughput only")
    parser.add_argument("--skip-packing", action="store_true", help="no packed-vs-padded comparison")
    parser.add_argument("--skip-precision", action="store_true", help="no fp32-vs-bf16-vs-auto comparison")
    parser.add_argument("--profile", action="store_true", help="cProfile the real loop's timed steps")
    parser.add_argument("--log-dir", type=Path, default=None, help="worker logs (default outputs/bench/<time>)")
    args = parser.parse_args(argv)
    args.sizes = (args.sizes or ("tiny" if args.quick else "tiny,30m")).split(",")
    unknown = [size for size in args.sizes if size not in SIZES]
    if unknown:
        parser.error(f"unknown --sizes {','.join(unknown)}; choose from {','.join(SIZES)}")
    args.log_dir = args.log_dir or ROOT / "outputs" / "bench" / time.strftime("%Y-%m-%d_%H-%M-%S")
    return args


def schedule(size: str, args: argparse.Namespace) -> Tuple[int, int, int]:
    """(warm-up steps, steps per round, rounds): a round of one loop takes ~1-4 s on 2 free cores."""
    if args.quick:
        return 1, 2, args.rounds or 2
    if size == "tiny":
        return 3, 8, args.rounds or 7
    return 2, 2, args.rounds or 5


def run_throughput(args: argparse.Namespace) -> Tuple[List[str], List[Check]]:
    rows, checks, shapes = [], [], {}
    trl_missing = importlib.util.find_spec("trl") is None
    for size in args.sizes:
        warmup, steps, rounds = schedule(size, args)
        shapes[size] = (rounds, steps)
        specs = [Spec(label, variant) for label, variant in LOOPS if not (variant == "trl" and trl_missing)]
        size_overrides(size)  # builds the model once, before any worker loads it
        say(f"{size}: starting {len(specs)} loops, then {rounds} interleaved rounds of {steps} steps each")
        outcomes = interleave(specs, size, warmup=warmup, steps=steps, rounds=rounds,
                              log_dir=args.log_dir, profile=args.profile,
                              progress=lambda r: say(f"{size}: round {r}/{rounds} done"))
        if trl_missing:
            outcomes.append(Outcome(Spec(LOOPS[3][0], "trl"), error="trl is not installed: pip install -e '.[bench]'"))
        rows += throughput_table(size, outcomes)
        checks += throughput_checks(size, {o.spec.variant: o for o in outcomes})
    return throughput_header(shapes) + rows, checks


def run_packing(args: argparse.Namespace) -> List[str]:
    """Packed vs padded rows, same loop, same batches: shown, not enforced (on a CPU, SDPA with a
    block-diagonal mask computes the whole row's scores, so packing only wins with varlen kernels)."""
    warmup, steps, rounds = schedule("tiny", args)
    rounds = min(rounds, 5)
    specs = [Spec(label, "real", [*PACKING_BATCH, *extra], tag=tag) for label, tag, extra in PACKING]
    say(f"packing: {len(specs)} loops, {rounds} interleaved rounds of {steps} steps each")
    outcomes = interleave(specs, "tiny", warmup=warmup, steps=steps, rounds=rounds, log_dir=args.log_dir,
                          required=("real",), progress=lambda r: say(f"packing: round {r}/{rounds} done"))
    header = throughput_header({"tiny, micro batch 8": (rounds, steps)})
    header[0] = header[0].replace("Training throughput", "Packing vs padding, vlm_sweep's loop")
    return header + throughput_table("tiny", outcomes) + [
        "  real tokens/s: the padding packing removes is not counted as work; packing_efficiency is logged per step"]


def run_precision(args: argparse.Namespace) -> Tuple[List[str], List[Check]]:
    """fp32, bf16 and auto, same loop, same batches: auto must be (within noise) the faster of the two."""
    lines, checks, shapes = [], [], {}
    for size in args.sizes:
        warmup, steps, rounds = schedule(size, args)
        rounds = min(rounds, 5)
        shapes[size] = (rounds, steps)
        specs = [Spec(label, "real", extra, tag=tag) for label, tag, extra in PRECISION]
        say(f"precision {size}: {len(specs)} loops, {rounds} interleaved rounds of {steps} steps each")
        outcomes = interleave(specs, size, warmup=warmup, steps=steps, rounds=rounds, log_dir=args.log_dir,
                              required=("real",), progress=lambda r: say(f"precision {size}: round {r}/{rounds} done"))
        picked = picked_precision(args.log_dir / f"{size}-real-auto.log")
        lines += throughput_table(size, outcomes) + [f"      auto picked: {picked}"]
        fp32, bf16, auto = outcomes
        worst = min(paired_ratio(auto, fp32), paired_ratio(auto, bf16))
        checks.append(Check(f"precision: auto / the faster of fp32, bf16, {size}", worst, AUTO_PRECISION_TARGET,
                            note=f"bf16 / fp32 {paired_ratio(bf16, fp32):.2f}x; auto picked {picked.split(' ')[0]}"))
    header = throughput_header(shapes)
    header[0] = header[0].replace("Training throughput", "Precision, vlm_sweep's loop")
    return header + lines, checks


def picked_precision(log: Path) -> str:
    """What the auto run logged it chose, and why ("bf16 (parallel.mixed_precision=auto; ...)")."""
    marker = "mixed precision: "
    for line in log.read_text(errors="replace").splitlines():
        if marker in line:
            return line.split(marker, 1)[1]
    return "? (not in the worker's log)"


def throughput_checks(size: str, by: Dict[str, Outcome]) -> List[Check]:
    real, checks = by["real"], []
    if size == "tiny":
        checks.append(Check(f"(a) real loop / (b) bare loop, {size}", paired_ratio(real, by["bare"]), 0.97))
    hf = by["hf"]
    checks.append(Check(f"(a) real loop / (c) transformers.Trainer, {size}",
                        None if hf.error else paired_ratio(real, hf), 1.0))
    trl = by.get("trl")
    if trl is not None and not trl.error:  # the target applies where TRL trains this VLM
        checks.append(Check(f"(a) real loop / (d) trl.SFTTrainer, {size}", paired_ratio(real, trl), 1.2))
    return checks


def measure_memory(args: List[str], log: Path) -> Dict[str, object]:
    """One measurement in a fresh process; its stderr goes to ``log``."""
    say(f"memory: {' '.join(args)}")
    with open(log, "w") as err:
        proc = subprocess.run([sys.executable, str(MEMORY_WORKER), *args], stdout=subprocess.PIPE,
                              stderr=err, text=True, timeout=1200)
    for line in proc.stdout.splitlines():
        if line.startswith(PREFIX):
            return json.loads(line[len(PREFIX):])
    tail = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()][-1:]
    return {"error": f"exit {proc.returncode}: {tail[0] if tail else 'no output'} (log: {log})"}


def run_memory(args: argparse.Namespace) -> Tuple[List[str], List[Check]]:
    mode = "quick" if args.quick else "full"
    size_overrides(CKPT_SHAPE[mode][0])  # builds the model once, before a worker loads it
    hidden, inter, vocab, layers, seq, labelled = LOSS_SHAPE[mode]
    size, ckpt_seq, ckpt_steps, _ = CKPT_SHAPE[mode]
    loss_rows = {name: measure_memory(["loss", which, *(str(v) for v in LOSS_SHAPE[mode])],
                                      args.log_dir / f"memory-loss-{which}.log")
                 for which, name in (("old", "old loss: all logits, .float(), CE over all positions"),
                                     ("new", "new loss: summed_token_loss (labelled positions)"),
                                     ("none", "reference: decoder only (no LM head, no loss)"))}
    ckpt_rows = {f"activation checkpointing {which}": measure_memory(
        ["ckpt", which, *(str(v) for v in CKPT_SHAPE[mode])], args.log_dir / f"memory-ckpt-{which}.log")
        for which in ("off", "on")}
    lines = memory_table(f"Peak host memory, MiB (one fresh process each; 'step' = high-water mark during the step "
                         f"minus RSS before it)\n  One training step, Gemma3ForCausalLM h{hidden}/ffn{inter}/"
                         f"vocab {vocab:,}, {layers} layer, fp32, LoRA, seq {seq}, {labelled} labelled positions:",
                         loss_rows)
    old, new, backbone = loss_rows.values()
    off, on = ckpt_rows.values()
    params = f", {off['params_m']:.1f}M parameters with LoRA" if "params_m" in off else ""
    lines += memory_table(f"  {size} (Gemma 3 VLM{params}, fp32), batch of {off.get('batch_rows', '?')} x "
                          f"{ckpt_seq} tokens, {ckpt_steps} optimizer steps:", ckpt_rows)
    return lines, memory_checks(old, new, backbone, off, on, size, ckpt_seq)


def memory_checks(old: dict, new: dict, backbone: dict, off: dict, on: dict, size: str, seq: int) -> List[Check]:
    if "error" in old or "error" in new:
        loss_drop, note = None, "a measurement failed"
    else:
        loss_drop = old["step_mib"] / max(new["step_mib"], 1.0)
        note = f"whole-process peak {old['peak_mib'] / new['peak_mib']:.2f}x"
        if "error" not in backbone:  # what the LM head + loss add on top of the decoder's own step
            head_old, head_new = (max(m["step_mib"] - backbone["step_mib"], 0.0) for m in (old, new))
            note += f"; LM head + loss beyond the decoder: {head_old:.0f} vs {head_new:.0f} MiB"
        note += f"; same loss {old['result']:.5f} / {new['result']:.5f}"
    checks = [Check("loss: step memory, old / new (Gemma 3 4B widths)", loss_drop, 4.0, note=note)]
    if "error" in off or "error" in on:
        return checks + [Check("activation checkpointing: step memory drop", None, 0.30)]
    drop = 1 - on["step_mib"] / max(off["step_mib"], 1.0)
    total = 1 - on["peak_mib"] / off["peak_mib"]
    checks.append(Check(f"activation checkpointing: step memory drop ({size}, seq {seq})", drop, 0.30, unit="",
                        note=f"whole-process peak drop {total:.3f}"))
    worst = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(on["result"], off["result"]))
    shown = {k: " ".join(f"{v:.6f}" for v in m["result"]) for k, m in (("off", off), ("on", on))}
    checks.append(Check("activation checkpointing: same losses (max relative diff)", worst, 1e-5, unit="",
                        at_most=True, note=f"off {shown['off']}; on {shown['on']}"))
    return checks


def say(message: str) -> None:
    """Progress on stderr (the tables go to stdout at the end)."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def failures(lines: List[str]) -> List[str]:
    """Rows that say a measurement failed (TRL's own failure is reported, not fatal)."""
    return [ln for ln in lines if "failed:" in ln and "trl.SFTTrainer" not in ln]


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    args.log_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    lines, checks = [], []
    try:
        got, more = run_throughput(args)
        lines += got + [""]
        checks += more
        if not args.skip_packing and "tiny" in args.sizes:
            lines += run_packing(args) + [""]
        if not args.skip_precision:
            got, more = run_precision(args)
            lines += got + [""]
            checks += more
        if not args.skip_memory:
            got, more = run_memory(args)
            lines += got + [""]
            checks += more
    except WorkerError as err:
        print(f"benchmark failed: {err}", file=sys.stderr)
        return 1
    print("\n".join(lines))
    enforced = not (args.quick or args.profile)
    why = "--quick has too few rounds to mean anything" if args.quick else "--profile slows loop (a) down"
    print("Checks" + ("" if enforced else f" (not enforced: {why})"))
    for check in checks:
        print(check.line(enforced=enforced))
    if args.profile:
        print_profiles(args.log_dir)
    print(f"\n{time.time() - started:.0f} s; worker logs in {args.log_dir}")
    missed = [c for c in checks if not c.ok]
    return 1 if failures(lines) or (missed and enforced) else 0


def print_profiles(log_dir: Path) -> None:
    import pstats

    for path in sorted(log_dir.glob("*.prof")):
        print(f"\ncProfile of the real loop's timed steps ({path.name}), top 25 by own time:")
        pstats.Stats(str(path), stream=sys.stdout).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    sys.exit(main())
