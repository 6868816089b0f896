import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, invoke, one_line, write_image
from spp_cli import __version__
from spp_cli.cli import cli

COMMANDS = sorted(cli.commands)


def test_version():
    result = invoke("--version")
    assert result.exit_code == 0 and result.output.strip() == f"spp, version {__version__}"


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help_does_not_import_torch(command):
    # A fresh interpreter: this test process has imported torch already.
    args = ["--help"] if command is None else [command, "--help"]
    code = (
        "import sys; from click.testing import CliRunner; from spp_cli.cli import cli;"
        f"r = CliRunner().invoke(cli, {args!r});"
        "assert r.exit_code == 0, r.output;"
        "assert 'Example' in r.output or 'Typical' in r.output, r.output;"
        "heavy = [m for m in ('torch', 'cv2', 'numpy', 'torchvision') if m in sys.modules];"
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


@pytest.mark.parametrize("command", COMMANDS)
def test_help_never_shows_a_bound_of_none(command):
    # click describes an unbounded FloatRange as "[x<=None]"; spp's FiniteFloat() has no bounds.
    result = invoke(command, "--help")
    assert result.exit_code == 0
    assert "None]" not in result.output


def test_propose_help_gives_the_defaults_the_run_takes():
    """--max-side, --top and --min-size default to None (a learned model's top is its own): the
    help says the numbers that selective search and spp train-proposals then take."""
    from spp_cli.proposals import ProposalParams
    from spp_cli.rpn import ProposalConfig

    text = " ".join(invoke("propose", "--help").output.split()).replace("train- proposals", "train-proposals")  # wrapped at its hyphen
    defaults = ProposalParams()
    assert f"(0 = full size; default: {defaults.max_side})" in text
    assert f"(default: {defaults.top}; a learned model's own, {ProposalConfig().top_n} from spp train-proposals)" in text
    assert f"(original pixels; default: {defaults.min_size})" in text


@pytest.mark.parametrize(("command", "held"), [("train", True), ("train-svm", True), ("finetune", True), ("train-proposals", True),
                                               ("detect", False), ("cache", False)])
def test_training_commands_hold_mkl_to_reproducible_sums(monkeypatch, command, held):
    """The training commands set MKL_CBWR before their first matrix product (the group runs first);
    detection keeps MKL's own, faster kernels."""
    monkeypatch.delenv("MKL_CBWR", raising=False)
    assert invoke(command, "--help").exit_code == 0
    assert os.environ.get("MKL_CBWR") == ("AVX2,STRICT" if held else None)
    monkeypatch.setenv("MKL_CBWR", "COMPATIBLE")
    invoke(command, "--help")
    assert os.environ["MKL_CBWR"] == "COMPATIBLE"  # the user's own value is kept


def test_console_script_and_module_entry_points():
    for argv in (["spp", "--help"], [sys.executable, "-m", "spp_cli", "--help"]):
        exe = Path(sys.executable).parent / "spp" if argv[0] == "spp" else None
        cmd = [str(exe), *argv[1:]] if exe else argv
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        for command in COMMANDS:
            assert command in out.stdout


def test_propose_batch_skips_bad_images_and_writes_good_ones(tmp_path):
    folder = tmp_path / "in put é"
    write_image(folder / "good one.jpg", 80, 60)
    write_image(folder / "ok.png", 80, 60, seed=2)
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "text.jpg").write_text("plain text")
    out = tmp_path / "props.json"
    result = invoke("propose", folder, "--out", out, "--workers", "1", "--max-side", "0")
    assert result.exit_code == 1
    assert f"skipped {folder / 'empty.jpg'}: empty file (0 bytes)" in result.stderr
    assert f"skipped {folder / 'text.jpg'}: not an image file Pillow can read" in result.stderr
    assert "2 input(s) skipped" in result.stderr
    doc = json.loads(out.read_text())
    assert doc["format"] == "spp-proposals" and doc["version"] == 1
    assert [im["id"] for im in doc["images"]] == ["good one", "ok"]
    assert all(len(im["boxes"]) > 0 for im in doc["images"])
    assert not (tmp_path / "props.json.partial").exists()


def test_propose_with_two_workers_matches_one(tmp_path):
    for i in range(3):
        write_image(tmp_path / "imgs" / f"{i}.jpg", 90, 70, seed=i)
    outs = []
    for workers in ("1", "2"):
        out = tmp_path / f"p{workers}.json"
        assert invoke("propose", tmp_path / "imgs", "--out", out, "--workers", workers).exit_code == 0
        outs.append(json.loads(out.read_text())["images"])
    assert outs[0] == outs[1]


def propose_three_images(tmp_path: Path) -> tuple[Path, dict]:
    """``tmp_path/imgs/{0,1,2}.jpg`` proposed into ``tmp_path/p.json``: its path and content."""
    for i in range(3):
        write_image(tmp_path / "imgs" / f"{i}.jpg", 90, 70, seed=i)
    out = tmp_path / "p.json"
    assert invoke("propose", tmp_path / "imgs", "--out", out, "--workers", "1").exit_code == 0
    return out, json.loads(out.read_text())


def test_propose_resumes_from_partial_journal(tmp_path):
    out, full = propose_three_images(tmp_path)
    # Simulate a run killed after the first image: journal with one entry
    # and a half-written second line.
    journal = tmp_path / "p.json.partial"
    first = dict(full["images"][0], seconds=0.1)
    journal.write_text(json.dumps({"params": full["params"]}) + "\n" + json.dumps(first) + "\n" + '{"id": "1", "pa')
    out.unlink()
    result = invoke("propose", tmp_path / "imgs", "--out", out, "--workers", "1")
    assert result.exit_code == 0
    assert "Resuming: 1 of 3 images already done." in result.stderr
    assert json.loads(out.read_text())["images"] == full["images"]
    assert not journal.exists()


def test_propose_resume_names_images_as_this_runs_inputs_do(tmp_path):
    # A journal line keeps its boxes; the image id in props.json is the one this run's inputs give it.
    out, full = propose_three_images(tmp_path)
    journal = tmp_path / "p.json.partial"
    first = dict(full["images"][0], id="a-stale-id", seconds=0.1)
    journal.write_text(json.dumps({"params": full["params"]}) + "\n" + json.dumps(first) + "\n")
    out.unlink()
    result = invoke("propose", tmp_path / "imgs", "--out", out, "--workers", "1")
    assert result.exit_code == 0
    assert "Resuming: 1 of 3 images already done." in result.stderr
    assert json.loads(out.read_text())["images"] == full["images"]


def test_propose_resume_searches_again_an_image_replaced_since_the_journal(tmp_path, monkeypatch):
    # A run interrupted after two images; then image 0 is replaced by image 2's bytes, as
    # `cp -p` does it (an mtime older than the journal's): its journaled boxes are not reused.
    import shutil

    import spp_cli.commands.propose as propose_command

    out, full = propose_three_images(tmp_path)
    out.unlink()
    real = propose_command.run_proposals

    def interrupted(tasks, params, workers):
        for k, result in enumerate(real(tasks, params, workers)):
            if k == 2:
                raise KeyboardInterrupt
            yield result

    monkeypatch.setattr(propose_command, "run_proposals", interrupted)
    result = invoke("propose", tmp_path / "imgs", "--out", out, "--workers", "1")
    assert result.exit_code == 130 and not out.exists()
    journal = tmp_path / "p.json.partial"
    assert journal.read_text().count("\n") == 3  # the header and images 0, 1
    monkeypatch.setattr(propose_command, "run_proposals", real)
    image = tmp_path / "imgs" / "0.jpg"
    shutil.copy2(tmp_path / "imgs" / "2.jpg", image)
    older = journal.stat().st_mtime_ns - 60 * 10**9
    os.utime(image, ns=(older, older))
    result = invoke("propose", tmp_path / "imgs", "--out", out, "--workers", "1")
    assert result.exit_code == 0
    assert f"{journal}: 1 image(s) modified since they were searched; searching them again." in result.stderr
    assert "Resuming: 1 of 3 images already done." in result.stderr
    images = json.loads(out.read_text())["images"]
    assert images[0]["boxes"] == full["images"][2]["boxes"] and images[1:] == full["images"][1:]


def test_propose_resume_takes_a_journal_line_without_file_stamp_under_the_mtime_rule(tmp_path):
    # A journal of an earlier spp records no size or mtime: an image modified after the
    # journal was written is searched again, as with a finished props.json.
    out, full = propose_three_images(tmp_path)
    journal = tmp_path / "p.json.partial"
    marker = [[1.0, 2.0, 30.0, 40.0]]
    unstamped = [{k: v for k, v in im.items() if k != "file"} for im in full["images"]]
    lines = [json.dumps({"params": full["params"]})] + [json.dumps(dict(im, boxes=marker)) for im in unstamped[:2]]
    journal.write_text("\n".join(lines) + "\n")
    out.unlink()
    newer = journal.stat().st_mtime_ns + 60 * 10**9
    os.utime(tmp_path / "imgs" / "1.jpg", ns=(newer, newer))
    result = invoke("propose", tmp_path / "imgs", "--out", out, "--workers", "1")
    assert result.exit_code == 0
    assert "Resuming: 1 of 3 images already done." in result.stderr
    images = json.loads(out.read_text())["images"]
    assert images[0]["boxes"] == marker and "file" not in images[0]  # its size and mtime were never known
    assert [{k: v for k, v in im.items() if k != "file"} for im in images[1:]] == unstamped[1:]


def test_propose_again_reuses_the_boxes_of_unchanged_images(tmp_path):
    out, full = propose_three_images(tmp_path)
    # The same run again: nothing to search, the same file.
    result = invoke("propose", tmp_path / "imgs", "--out", out, "--workers", "1")
    assert result.exit_code == 0
    assert (f"Reusing 3 of 3 images' boxes from {out} (same settings, image files not modified since it was "
            "written; delete it to search again).") in result.stderr
    assert json.loads(out.read_text()) == full
    # An image written after the file is searched again; one added joins; one gone leaves.
    write_image(tmp_path / "imgs" / "1.jpg", 90, 70, seed=7)
    write_image(tmp_path / "imgs" / "3.jpg", 90, 70, seed=3)
    (tmp_path / "imgs" / "2.jpg").unlink()
    result = invoke("propose", tmp_path / "imgs", "--out", out, "--workers", "1")
    assert result.exit_code == 0
    assert "Reusing 1 of 3 images' boxes" in result.stderr
    again = {im["id"]: im for im in json.loads(out.read_text())["images"]}
    assert list(again) == ["0", "1", "3"] and again["0"] == full["images"][0] and again["1"] != full["images"][1]
    fresh = tmp_path / "fresh.json"
    assert invoke("propose", tmp_path / "imgs", "--out", fresh, "--workers", "1").exit_code == 0
    assert json.loads(fresh.read_text())["images"] == list(again.values())
    # Other settings: every image is searched again.
    result = invoke("propose", tmp_path / "imgs", "--out", out, "--workers", "1", "--top", "50")
    assert result.exit_code == 0 and "Reusing" not in result.stderr
    assert all(len(im["boxes"]) <= 50 for im in json.loads(out.read_text())["images"])


def test_propose_again_searches_an_image_replaced_by_one_with_an_older_mtime(tmp_path):
    # `cp -p` or `rsync -a` keeps the source's mtime: older than props.json, so make's rule alone
    # would reuse the old image's boxes. Each entry records its file's size and mtime.
    out, full = propose_three_images(tmp_path)
    assert all(set(im["file"]) == {"size", "mtime_ns"} for im in full["images"])
    write_image(tmp_path / "other.jpg", 120, 80, seed=9)
    older = out.stat().st_mtime_ns - 3600 * 10**9
    (tmp_path / "other.jpg").replace(tmp_path / "imgs" / "1.jpg")
    os.utime(tmp_path / "imgs" / "1.jpg", ns=(older, older))
    result = invoke("propose", tmp_path / "imgs", "--out", out, "--workers", "1")
    assert result.exit_code == 0
    assert "Reusing 2 of 3 images' boxes" in result.stderr
    again = json.loads(out.read_text())["images"]
    assert again[0] == full["images"][0] and again[2] == full["images"][2]
    assert (again[1]["width"], again[1]["height"]) == (120, 80)
    # A props.json of an earlier spp (no "file" on its entries) is reused under make's rule.
    legacy = json.loads(out.read_text())
    for image in legacy["images"]:
        del image["file"]
    out.write_text(json.dumps(legacy))
    result = invoke("propose", tmp_path / "imgs", "--out", out, "--workers", "1")
    assert result.exit_code == 0 and "Reusing 3 of 3 images' boxes" in result.stderr


def test_propose_takes_the_images_a_caller_searched_already(tmp_path, capsys):
    # `spp train`'s choice of proposals searches the validation images first; the search of
    # every image then takes their boxes as they are (a marker box shows they were not searched again).
    from spp_cli.commands.propose import run_propose
    from spp_cli.proposals import ImageProposals

    out, full = propose_three_images(tmp_path)
    path = full["images"][1]["path"]
    marker = np.array([[1, 2, 30, 40]], np.float32)
    fresh = tmp_path / "fresh.json"
    searched = {path: ImageProposals("1", path, 90, 70, marker), str(tmp_path / "elsewhere.jpg"): ImageProposals("x", "x", 9, 9, marker)}
    assert run_propose((str(tmp_path / "imgs"),), None, None, fresh, "fast", None, None, None, None, 1, False, searched=searched) == 0
    assert "Searched already: 1 of 3 images." in capsys.readouterr().err
    images = json.loads(fresh.read_text())["images"]
    assert [im["id"] for im in images] == ["0", "1", "2"] and images[1]["boxes"] == marker.tolist()
    assert [images[0], images[2]] == [full["images"][0], full["images"][2]]


def test_existing_output_survives_a_failed_run(tmp_path):
    out = tmp_path / "p.json"
    out.write_text("precious")
    result = invoke("propose", tmp_path / "missing", "--out", out)
    assert result.exit_code == 1
    assert result.stderr.strip() == f"Error: {tmp_path / 'missing'}: no such file or folder"
    assert out.read_text() == "precious"


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "Error: no input: give image files, folders, globs or a .txt list, or --data SPEC"),
        (["x.jpg", "--data", "d"], "Error: give image INPUTs or --data, not both"),
        (["--split", "test", "x.jpg"], "Error: --split needs --data"),
        (["x.jpg", "--report"], "Error: --report needs ground truth: use --data SPEC"),
        (["x.jpg", "--strategy", "magic"], "Error: unknown proposal strategy 'magic' (valid: original-fast-fine, original-fast, original-fast-opencv-rank, opencv-fast, opencv-quality)"),
        (["x.jpg", "--mode", "quality", "--strategy", "original-fast"], "Error: --mode and --strategy both choose the search: give one"),
    ],
)
def test_propose_usage_errors(tmp_path, args, message):
    # Options that are missing, do not go together, or name nothing: exit code 2, as click's own usage errors.
    result = invoke("propose", *args, "--out", tmp_path / "p.json")
    assert result.exit_code == 2
    assert result.stderr.strip() == message


def test_propose_bad_option_value(tmp_path):
    result = invoke("propose", "x.jpg", "--top", "abc", "--out", tmp_path / "p.json")
    assert result.exit_code == 2
    assert "Invalid value for '--top': 'abc' is not a valid integer" in result.stderr


def test_propose_dataset_with_bad_annotation_lists_it(xml_dataset, tmp_path):
    (xml_dataset / "annotations" / "b.xml").write_text("<annotation><object><name>x</name></object></annotation>")
    out = tmp_path / "p.json"
    result = invoke("propose", "--data", xml_dataset, "--out", out, "--workers", "1", "--report")
    assert result.exit_code == 1
    assert f"skipped {xml_dataset / 'annotations' / 'b.xml'}: object 1 ('x') has no <bndbox>" in result.stderr
    assert "recall@0.5" in result.stderr
    assert [im["id"] for im in json.loads(out.read_text())["images"]] == ["a", "c"]


def test_output_into_read_only_folder(tmp_path, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    if os.geteuid() == 0:
        # root ignores permission bits: simulate what os.access reports on a read-only mount.
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(ro) and mode & os.W_OK else real_access(p, mode))
    write_image(tmp_path / "a.jpg")
    try:
        result = invoke("propose", tmp_path / "a.jpg", "--out", ro / "p.json")
    finally:
        ro.chmod(0o700)
    assert result.exit_code == 1
    assert result.stderr.strip() == f"Error: {ro / 'p.json'}: folder {ro} is not writable"
    assert list(ro.iterdir()) == []


def test_written_files_follow_the_umask(tmp_path):
    from spp_cli.fileio import atomic_write_bytes

    old = os.umask(0o022)
    try:
        atomic_write_bytes(tmp_path / "out.bin", b"x")
    finally:
        os.umask(old)
    assert (tmp_path / "out.bin").stat().st_mode & 0o777 == 0o644


def test_threads_limits_torch_in_this_process(monkeypatch):
    import torch

    monkeypatch.setenv("OMP_NUM_THREADS", "unset-by-test")  # restored after the test
    before = torch.get_num_threads()
    try:
        result = invoke("--threads", "1", "models")
        assert result.exit_code == 0, result.output
        assert torch.get_num_threads() == 1 and os.environ["OMP_NUM_THREADS"] == "1"
    finally:
        torch.set_num_threads(before)


def test_threads_from_the_environment_before_torch_loads():
    # A fresh interpreter: the group reads SPP_THREADS before any command imports torch,
    # so torch must take the limit from OMP_NUM_THREADS when it loads.
    code = (
        "import sys; from click.testing import CliRunner; from spp_cli.cli import cli;"
        "r = CliRunner().invoke(cli, ['models']);"
        "assert r.exit_code == 0, r.output;"
        "import torch; assert torch.get_num_threads() == 1, torch.get_num_threads()"
    )
    env = {**os.environ, "SPP_THREADS": "1"}
    env.pop("OMP_NUM_THREADS", None)
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, env=env)


def test_threads_must_be_positive():
    result = invoke("--threads", "0", "models")
    assert result.exit_code == 2
    assert one_line(result) == "Error: Invalid value for '--threads': 0 is not in the range x>=1. See `cli --help`."


@pytest.mark.parametrize(("args", "message"), [
    (["propose", "x.jpg", "--top", "abc"], "Error: Invalid value for '--top': 'abc' is not a valid integer range. See `cli propose --help`."),
    (["train-svm"], "Error: Missing option '--cache'. See `cli train-svm --help`."),
    (["detect", "x.jpg", "--max-dets", "5"], "Error: No such option '--max-dets'. Did you mean '--max-det'? See `cli detect --help`."),
    (["nosuch"], "Error: No such command 'nosuch'. See `cli --help`."),
])
def test_usage_errors_are_one_line_that_says_where_the_options_are(args, message):
    # (click's runner names the program `cli`; the installed command is `spp`.)
    result = invoke(*args)
    assert result.exit_code == 2
    assert one_line(result) == message


def test_a_bare_command_still_shows_its_help():
    result = invoke()
    assert result.exit_code == 2
    assert "Commands:" in result.output


def test_eval_refuses_a_detections_path_with_a_nul_character(tmp_path, xml_dataset):
    # Path.resolve() raises ValueError on it: the reader says so on one line instead.
    dets = tmp_path / "dets.json"
    dets.write_text(json.dumps({"format": "spp-detections", "version": 1, "classes": ["cat"],
                                "images": [{"path": "a\0.jpg", "detections": []}]}))
    result = invoke("eval", dets, "--data", xml_dataset, "--split", "train")
    assert result.exit_code == 1
    assert one_line(result) == f"Error: {dets}: images[0] has a path with a NUL character"


def test_eval_says_which_annotations_it_could_not_read(tmp_path, xml_dataset):
    for image_id in ("a", "b", "c"):
        (xml_dataset / "annotations" / f"{image_id}.xml").write_text("<annotation><object>")
    dets = tmp_path / "dets.json"
    dets.write_text(json.dumps({"format": "spp-detections", "version": 1, "classes": ["cat"], "images": []}))
    result = invoke("eval", dets, "--data", xml_dataset, "--split", "train")
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert lines[0] == "2 input(s) skipped:"
    assert lines[1].startswith(f"  skipped {xml_dataset / 'annotations' / 'a.xml'}: ")
    assert lines[-1] == f"Error: {xml_dataset}: no image of split 'train' has usable annotations (the files above)"


def test_eval_of_detections_made_on_other_images(tmp_path, xml_dataset):
    dets = tmp_path / "dets.json"
    entry = {"id": "zz", "path": str(tmp_path / "zz.jpg"), "width": 64, "height": 48, "detections": []}
    dets.write_text(json.dumps({"format": "spp-detections", "version": 1, "classes": ["cat", "dog"], "images": [entry]}))
    result = invoke("eval", dets, "--data", xml_dataset, "--split", "test")
    assert result.exit_code == 1
    assert result.stderr.strip() == (
        f"Error: {dets}: none of the 1 image(s) of {xml_dataset} (split 'test') has an entry; were the detections made on another split?"
    )


@pytest.mark.parametrize("classes", [None, "cat", {"cat": 0}, ["cat", 1]])
def test_eval_of_detections_without_a_list_of_classes_names_the_file(tmp_path, xml_dataset, classes):
    doc = {"format": "spp-detections", "version": 1, "images": []}
    if classes is not None:
        doc["classes"] = classes
    dets = tmp_path / "dets.json"
    dets.write_text(json.dumps(doc))
    result = invoke("eval", dets, "--data", xml_dataset, "--split", "test")
    assert result.exit_code == 1
    assert result.stderr.strip() == f'Error: {dets}: "classes" is not a list of class names'


def test_eval_against_a_dataset_without_images(tmp_path, coco_dataset):
    doc = json.loads(coco_dataset.read_text())
    coco_dataset.write_text(json.dumps({**doc, "images": [], "annotations": []}))
    dets = tmp_path / "dets.json"
    dets.write_text(json.dumps({"format": "spp-detections", "version": 1, "classes": ["cat"], "images": []}))
    result = invoke("eval", dets, "--data", coco_dataset)
    assert result.exit_code == 1
    assert result.stderr.strip() == f"Error: {coco_dataset}: no images in split 'all'"


RESUMES = "Interrupted. Finished work is kept; run the same command again to resume."


@pytest.mark.parametrize("args, module, function, message", [
    (["propose", "photos", "--out", "props.json"], "propose", "run_propose", RESUMES),
    (["detect", "photos", "--out", "dets.json"], "detect", "run_detect",
     "Interrupted. The images finished are kept beside --out and in --save-dir; run the same command again to resume (without --out, it "
     "starts over)."),
    (["train-svm", "--cache", "cache", "--out", "model.safetensors"], "train_svm", "run_train_svm",
     "Interrupted. Hard-negative mining's state is saved beside --out as it goes (a minute apart at least); run the same command again "
     "to resume from the last save (a run stopped before one starts over)."),
])
def test_interrupt_says_whether_the_command_resumes(monkeypatch, args, module, function, message):
    import importlib

    def interrupted(*_, **__):
        raise KeyboardInterrupt

    monkeypatch.setattr(importlib.import_module(f"spp_cli.commands.{module}"), function, interrupted)
    result = invoke("--threads", "1", *args)
    assert result.exit_code == 130
    assert result.stderr.strip().splitlines() == [message]


def test_every_command_has_an_interrupt_note():
    from spp_cli.cli import RESUMING, interrupted_message

    assert RESUMING <= set(COMMANDS)
    for command in COMMANDS:
        resumes = interrupted_message(command) == RESUMES
        assert resumes == (command in RESUMING), command


def test_threads_also_caps_selective_searchs_worker_processes(tmp_path, monkeypatch):
    # `spp --threads N` (OMP_NUM_THREADS, as a batch system may set it) is the run's share of the cores.
    monkeypatch.setenv("OMP_NUM_THREADS", "unset-by-test")  # restored after the test
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    import torch

    images = [write_image(tmp_path / f"{n}.jpg", seed=n) for n in range(3)]
    threads = torch.get_num_threads()
    try:
        result = invoke("--threads", "2", "propose", *images, "--out", tmp_path / "p.json")
        assert result.exit_code == 0, result.output
        assert "s/image wall with 2 worker(s)" in result.stderr
        result = invoke("--threads", "1", "propose", *images, "--out", tmp_path / "p.json", "--workers", "3")
        assert result.exit_code == 0, result.output
        assert "s/image wall with 3 worker(s)" in result.stderr  # asked for: as given
    finally:
        torch.set_num_threads(threads)  # spp --threads told the torch of this process
