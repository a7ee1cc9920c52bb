"""The `mpl-fast` command line."""
import argparse
import math
import os
import signal
import sys
import traceback

from mpl_fast import __version__
from mpl_fast.train.stop_signal import Stopped


class CliError(Exception):
    """A user-facing failure: printed as one line, exit status 2."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, with what the user can do next: printed as one line, exit status 130."""


def _rank_0() -> bool:
    """Whether this process reports for the run: the only one, or torchrun's rank 0."""
    return int(os.environ.get("RANK", "0")) == 0


def _mpl_config(preset_name, overrides):
    from mpl_fast.mpl import PRESETS, MPLConfig
    from mpl_fast.train.config import ConfigError, parse_override

    if preset_name not in PRESETS:
        raise CliError(f"unknown preset {preset_name!r}; "
                       f"choose one of {', '.join(sorted(PRESETS))}")
    fields = set(MPLConfig.__dataclass_fields__)
    changes = {}
    for item in overrides:
        try:
            key, value = parse_override(item)
        except ConfigError as err:
            raise CliError(str(err)) from err
        if key not in fields:
            raise CliError(f"--set {key}: unknown MPL setting")
        changes[key] = value
    try:
        return PRESETS[preset_name].replace(**changes)
    except (ValueError, TypeError) as err:
        raise CliError(str(err)) from err


def _seed_range(text):
    """'S' or 'A-B' (inclusive) -> the seeds (a range), for --seed."""
    try:
        lo, sep, hi = text.partition("-")
        seeds = range(int(lo), int(hi if sep else lo) + 1)
    except ValueError:
        seeds = range(0)
    # numpy and scikit-learn take seeds up to 2**32 - 1 (make_moons' random_state)
    if not seeds or seeds[0] < 0 or seeds[-1] >= 2**32:
        raise CliError("--seed expects a seed S or a range A-B with 0 <= A <= B < 2**32, "
                       f"got {text!r}")
    return seeds


def _one_process(command):
    """Refuse a command torchrun started in several processes: each would write the same files
    (two-moons' figures, a benchmark's records) at once."""
    world = os.environ.get("WORLD_SIZE", "1")
    if world.isdigit() and int(world) > 1:
        raise CliError(f"`mpl-fast {command}` runs in one process, not under torchrun "
                       f"(WORLD_SIZE={world}); train, eval and logits take torchrun")


def _two_moons(args):
    _one_process("two-moons")
    from pathlib import Path

    from mpl_fast.train import two_moons

    if args.steps < 1:
        raise CliError(f"--steps must be >= 1, got {args.steps}")
    if not (math.isfinite(args.lr) and args.lr > 0):
        raise CliError(f"--lr must be finite and > 0, got {args.lr}")
    if not (math.isfinite(args.uda_noise) and args.uda_noise >= 0):
        raise CliError(f"--uda-noise must be finite and >= 0, got {args.uda_noise}")
    seeds = _seed_range(args.seed)
    config = _mpl_config(args.preset, args.set)
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CliError(f"cannot create --out {out}: {err.strerror}") from err
    runs = []
    for seed in seeds:
        seed_out = out if len(seeds) == 1 else out / f"seed_{seed}"
        seed_out.mkdir(exist_ok=True)
        metrics, data, models = two_moons.run(seed, steps=args.steps, lr=args.lr, config=config,
                                              uda_noise=args.uda_noise,
                                              progress=lambda msg: print(msg, flush=True))
        two_moons.write_json(seed_out / "metrics.json", metrics)
        two_moons.plot(seed_out / "two_moons.png", data, models, metrics)
        check = metrics["objective_check"]
        print("  ".join(f"{name} {metrics[key]:.3f}" for name, key in two_moons.method_keys(models))
              + f"  -> {seed_out}\n  labeled CE (what MPL's feedback minimises) of a student on "
              f"the true labels {check['labeled_ce_student_on_true_labels']:.4f}, on the "
              f"supervised teacher's labels {check['labeled_ce_student_on_supervised_labels']:.4f}",
              flush=True)
        runs.append(metrics)
    if len(runs) > 1:
        summary = two_moons.summarize(runs)
        two_moons.write_json(out / "summary.json", summary)
        for key, stats in summary["accuracy"].items():
            print(f"{key:>18}: mean {stats['mean']:.3f}  min {stats['min']:.3f}")
        print(f"summary -> {out / 'summary.json'}")
    return 0


def _bench(args):
    _one_process(f"bench {args.what}")
    import runpy
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "benchmarks" / f"bench_{args.what}.py"
    if not script.exists():
        raise CliError(f"{script} not found: `bench` runs from a source checkout")
    from mpl_fast.train.checkpoint import CheckpointError
    from mpl_fast.train.loop import TrainError

    module = runpy.run_path(str(script))
    try:
        return module["main"](args.rest)
    except (ValueError, TrainError, CheckpointError) as err:  # bad data, config, run: one line
        raise CliError(str(err)) from err


def _train(args):
    from pathlib import Path

    from mpl_fast.train import checkpoint, config as cfg
    from mpl_fast.train.loop import TrainError, method_label, train

    overrides = list(args.set)
    for flag, key in (("steps", "train.steps"), ("seed", "train.seed"), ("device", "train.device"),
                      ("eval_every", "train.eval_every"),
                      ("checkpoint_every", "train.checkpoint_every"),
                      ("profile", "train.profile_steps")):
        if getattr(args, flag) is not None:
            overrides.append(f"{key}={getattr(args, flag)}")
    from mpl_fast.train import distributed

    out = Path(args.out or f"runs/{Path(args.config).stem}")
    try:
        config = cfg.load(args.config, overrides)
        summary = train(config, out, resume=args.resume, overwrite=args.overwrite)
    except (cfg.ConfigError, TrainError, checkpoint.CheckpointError) as err:
        raise CliError(str(err)) from err
    except KeyboardInterrupt:
        raise _interrupted_run(out) from None
    finally:
        distributed.shutdown()
    if not _rank_0():
        return 0
    line = (f"done: {summary['steps']} steps, {method_label(config)}  top-1 student "
            f"{summary['student_top1']:.4f}  EMA student {summary['ema_student_top1']:.4f}")
    if summary.get("teacher_top1") is not None:
        line += f"  teacher {summary['teacher_top1']:.4f}"
    if "finetuned_student_top1" in summary:
        line += f"  finetuned {summary['finetuned_student_top1']:.4f}"
    print(line + f"  -> {out}")
    return 0


def _interrupted_run(out):
    """Where an interrupted run can be continued from (its last checkpoint), if anywhere."""
    from mpl_fast.train import checkpoint

    try:
        step = checkpoint.load(out / "last.pt", mmap=True)["step"]
    except (OSError, KeyError, checkpoint.CheckpointError):
        return Interrupted("interrupted")
    return Interrupted(f"interrupted; {out / 'last.pt'} holds step {step}: the same command "
                       f"with --resume continues from there")


def _eval(args):
    from mpl_fast.train import checkpoint, config as cfg, distributed
    from mpl_fast.train.loop import TrainError, run_from_checkpoint
    from mpl_fast.progress import ProgressLines

    try:
        run, state, path = run_from_checkpoint(args.checkpoint, args.set)
        # under torchrun the replicas share the evaluation; rank 0 alone reports it
        progress = ProgressLines("eval:", "test images") if run.dist.main else None
        if "ema" in state:  # last.pt, best.pt: the whole run's state
            result = run.evaluate(progress=progress)
        else:  # finetuned.pt: the finetuned student alone
            result = run.evaluate({"finetuned_student": run.student}, progress=progress)
    except (cfg.ConfigError, TrainError, checkpoint.CheckpointError) as err:
        raise CliError(str(err)) from err
    finally:
        distributed.shutdown()
    if not run.dist.main:
        return 0
    step = f", step {state['step']}" if "step" in state else ""
    print(f"{path}{step}")
    for key, value in result.items():
        print(f"{key[5:]:24s} {value:.4f}")
    return 0


def _logits(args):
    from mpl_fast.train import checkpoint, config as cfg, distributed, teacher_logits
    from mpl_fast.train.loop import TrainError

    if args.batch_size is not None and args.batch_size < 1:
        raise CliError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.checkpoint is not None:
        for flag in ("weights", "pretrained", "config"):
            if getattr(args, flag):
                raise CliError(f"--{flag} goes with --model (a --checkpoint holds its network, "
                               "weights and data)")

        def source():
            return teacher_logits.from_checkpoint(args.checkpoint, args.network, args.set)
    else:
        if args.network is not None:
            raise CliError("--network picks a network of a --checkpoint; --model names one")

        def source():
            return teacher_logits.from_model(args.model, args.config or "digits", args.set,
                                             args.weights, args.pretrained)
    try:
        network, report = teacher_logits.write(args.out, source, args.batch_size,
                                               args.overwrite, progress=True)
    except (cfg.ConfigError, TrainError, checkpoint.CheckpointError) as err:
        raise CliError(str(err)) from err
    finally:
        distributed.shutdown()
    if not _rank_0():
        return 0
    print(f"{network} logits -> {args.out}: " + ", ".join(
        f"{split} {r['rows']} rows (top-1 {r['top1']:.4f})" for split, r in report.items()))
    print(f"Reduced MPL: mpl-fast train --set model.teacher=reduced "
          f"--set model.teacher_logits={args.out} --set mpl.uda_weight=0 ...")
    return 0


def build_parser():
    parser = argparse.ArgumentParser(
        prog="mpl-fast",
        description="Meta Pseudo Labels, fast: train, evaluate and benchmark MPL.")
    parser.add_argument("--version", action="version", version=f"mpl-fast {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("train", help="train MPL (default: the embedded digits preset)",
                       description="Train MPL (or a baseline) from a preset in configs/ or a YAML "
                       "file. Writes DIR/config.yaml, metrics.jsonl, tensorboard/, last.pt, "
                       "best.pt, finetuned.pt (with train.finetune_steps), summary.json, "
                       "curves.png and profile/ (with --profile). A DIR that holds a run needs "
                       "--resume or --overwrite. SIGTERM stops a run after the step under way, "
                       "with last.pt saved at it (exit status 143).")
    p.add_argument("--config", default="digits",
                   help="preset name (digits, digits_supervised, ...) or YAML file "
                   "(default: %(default)s)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set optim.teacher_lr=0.1 (repeatable)")
    p.add_argument("--out", help="output folder (default: runs/<config>)")
    p.add_argument("--steps", type=int, help="train.steps")
    p.add_argument("--seed", type=int, help="train.seed")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="train.device")
    again = p.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true", help="continue from DIR/last.pt")
    again.add_argument("--overwrite", action="store_true",
                       help="train a new run in DIR even if it holds one (its files are replaced)")
    p.add_argument("--eval-every", type=int, help="train.eval_every")
    p.add_argument("--checkpoint-every", type=int, help="train.checkpoint_every")
    p.add_argument("--profile", type=int, metavar="N",
                   help="train.profile_steps: record N steps with torch.profiler, from the "
                        "session's step train.profile_from (default 5), into DIR/profile/ "
                        "(trace.json.gz, summary.json: ms a step by phase, ops.txt)")
    p.set_defaults(run=_train)
    p = sub.add_parser("eval", help="evaluate a checkpoint",
                       description="Top-1/top-5 of the student, EMA student and teacher of a "
                       "checkpoint (of the finetuned student, for finetuned.pt) on its run's "
                       "test split. Under torchrun the processes share the test split, each "
                       "reading and decoding its own batches, and rank 0 prints the table.")
    p.add_argument("--checkpoint", required=True,
                   help="a last.pt, best.pt or finetuned.pt written by train, or a run folder "
                        "(its last.pt)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (e.g. train.device=cpu)")
    p.set_defaults(run=_eval)
    p = sub.add_parser("logits", help="store a trained network's logits for Reduced MPL",
                       description="Run a trained network over the training and test splits "
                       "of its data once (unaugmented, in the data's order) and store its "
                       "logits (fp16, memory-mapped) as OUT/train.logits and OUT/test.logits. "
                       "The network: a checkpoint of mpl-fast train (its run's data), or a "
                       "model named with its weights over the data of --config and --set. "
                       "Reduced MPL then trains with a small teacher over them: mpl-fast train "
                       "--set model.teacher=reduced --set model.teacher_logits=OUT --set "
                       "mpl.uda_weight=0 (with the same data settings). Under torchrun the "
                       "processes share the work, each running its batches, and rank 0 writes "
                       "the stores.")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--checkpoint",
                       help="a last.pt, best.pt or finetuned.pt written by train, or a run "
                            "folder (its last.pt)")
    which.add_argument("--model", help="a model name as in model.student (wrn28_2, resnet50, "
                       "timm:<name>, ...), with --weights or --pretrained")
    p.add_argument("--out", required=True, help="folder for the stores")
    p.add_argument("--network", choices=["ema_student", "student", "teacher"],
                   help="which network of the checkpoint (default: the EMA student; the "
                        "finetuned student of a finetuned.pt)")
    weights = p.add_mutually_exclusive_group()
    weights.add_argument("--weights", metavar="FILE", help="--model's weights: a state dict "
                         "saved with torch.save (also inside a 'state_dict' or 'model' key)")
    weights.add_argument("--pretrained", action="store_true",
                         help="--model's weights: timm's pretrained ones (downloaded by timm; "
                              "their classes and input normalisation must fit the data)")
    p.add_argument("--config", help="--model's data: a preset or YAML file, as in train "
                   "(default: digits)")
    p.add_argument("--batch-size", type=int, help="images a forward (default: the run's "
                   "train.eval_batch_size)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key of the run (e.g. data.root=... if the data moved)")
    p.add_argument("--overwrite", action="store_true", help="replace the stores OUT holds")
    p.set_defaults(run=_logits)
    p = sub.add_parser("bench", help="benchmarks: ops, step, data, methods",
                       description="`mpl-fast bench ops|step|data|methods [options]` runs "
                       "benchmarks/bench_<what>.py (see e.g. `mpl-fast bench step --help`); "
                       "methods trains supervised, UDA-only and MPL at one budget.")
    p.add_argument("what", choices=["ops", "step", "data", "methods"])
    p.add_argument("rest", nargs=argparse.REMAINDER, help="options of the benchmark")
    p.set_defaults(run=_bench)
    p = sub.add_parser("two-moons", help="the paper's TwoMoons illustration",
                       description="Supervised vs Pseudo Labels vs MPL on two moons (2000 points, "
                       "6 labeled). Writes OUT/metrics.json and OUT/two_moons.png. metrics.json "
                       "also holds objective_check: the labeled-set CE of a student trained on "
                       "the true labels vs on the supervised teacher's labels.")
    p.add_argument("--seed", default="0", metavar="S|A-B",
                   help="one seed, or an inclusive range: each seed then goes to OUT/seed_S/ and "
                   "OUT/summary.json holds the mean and min accuracy per method (default: 0)")
    p.add_argument("--out", default="runs/two_moons", help="output folder (default: %(default)s)")
    p.add_argument("--steps", type=int, default=3000,
                   help="steps per method (default: %(default)s)")
    p.add_argument("--lr", type=float, default=0.1, help="SGD learning rate (default: %(default)s)")
    p.add_argument("--preset", default="paper", help="MPL preset (default: %(default)s)")
    p.add_argument("--uda-noise", type=float, default=0.0, metavar="SIGMA",
                   help="give the teacher UDA consistency on copies of the points with Gaussian "
                   "noise SIGMA (and train a UDA-only teacher to compare); 0 = off, the paper's "
                   "plain MPL (default: %(default)s)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override an MPL setting, e.g. --set estimator=dot")
    p.set_defaults(run=_two_moons)
    return parser


def main(argv=None):
    try:
        code = _command(argv)
    except SystemExit as exit_:  # e.g. a parser's error after the group started: its own status
        _end_torchrun_process(_exit_status(exit_))
        raise
    except BaseException:
        _end_torchrun_process(1, failed=True)
        raise
    _end_torchrun_process(code)
    return code


def _exit_status(exit_):
    """The status the interpreter would end with for this SystemExit (a message: printed, 1)."""
    if exit_.code is None or isinstance(exit_.code, int):
        return exit_.code or 0
    if _torchrun_group() is not None:  # end_process skips the interpreter, which would print it
        print(exit_.code, file=sys.stderr)
    return 1


def _torchrun_group():
    """mpl_fast.train.distributed where this process started a process group, else None."""
    distributed = sys.modules.get("mpl_fast.train.distributed")
    return distributed if distributed is not None and distributed.started() else None


def _end_torchrun_process(code, failed=False):
    """A process that started a process group (under torchrun) ends here, without the
    interpreter's teardown (mpl_fast.train.distributed.end_process says why), its traceback
    first if it failed; any other returns."""
    distributed = _torchrun_group()
    if distributed is not None:
        if failed:
            traceback.print_exc()
        distributed.end_process(code)


def _command(argv):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        from mpl_fast.ops.backend import requested

        try:  # every command runs the ops: an unknown name stops it before any work
            requested()
        except ValueError as err:
            raise CliError(str(err)) from err
        return args.run(args) or 0
    except CliError as err:
        print(f"mpl-fast: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:  # under torchrun every process gets Ctrl-C: one line
        if _rank_0():
            print(f"mpl-fast: {err if isinstance(err, Interrupted) else 'interrupted'}",
                  file=sys.stderr)
        return 130
    except Stopped as err:  # train, bench methods: SIGTERM, with a checkpoint of the last step
        if _rank_0():
            print(f"mpl-fast: {err}: the same command with --resume continues from there",
                  file=sys.stderr)
        return 128 + signal.SIGTERM


if __name__ == "__main__":
    sys.exit(main())
