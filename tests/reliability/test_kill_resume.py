"""Kill anywhere, one suite over the tasks: SIGKILLed `generator train`, `segment train` and `synthesize` resume
to the uninterrupted result.

Each CLI run is killed a seeded random time after it made progress (a checkpoint or a sample written), the
output folder is checked for half-written files, and the final resumed output is compared with an
uninterrupted in-process reference: equal bytes, equal tensors, 0 bytes lost. A foreign or corrupt
checkpoint is refused with exit code 2 and a message naming the file.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch

from todsynth.io import load_weights

from reliability_helpers import (
    SYNTH_SAMPLES,
    KillLog,
    bytes_lost,
    check_visible_files,
    file_bytes,
    invoke,
    is_temp,
    json_step,
    kill_sequence,
    synth_args,
    synth_keep,
    torch_threads,
)

GEN_SETTINGS: dict[str, str] = {
    "steps": "40",
    "batch_size": "2",
    "size": "16",
    "model.num_layers": "1",
    "model.num_heads": "2",
    "model.head_dim": "8",
    "val_every": "0",
    "text_max_length": "8",
    "progress": "false",
    "warmup_steps": "2",
    "checkpoint_every": "1",
    "full_state_every": "1",
    "ema_decay": "0.9",
    "lr": "0.001",
}
SEG_SETTINGS: dict[str, str] = {
    "arch": "segformer",
    "encoder": "tu-mobilenetv3_small_050",
    "size": "16",
    "steps": "24",
    "batch_size": "2",
    "device": "cpu",
    "checkpoint_every": "1",
    "log_every": "1",
    "lr": "0.001",
}


def sets(settings: dict[str, str]) -> list[str]:
    """`--set key=value` arguments."""
    return [x for k, v in settings.items() for x in ("--set", f"{k}={v}")]


def gen_args(data: Path, out: Path, *extra: str) -> list[str]:
    """`todsynth generator train` arguments for GEN_SETTINGS."""
    return ["generator", "train", str(data), "--out", str(out), *sets(GEN_SETTINGS), *extra]


def seg_args(data: Path, out: Path, *extra: str) -> list[str]:
    """`todsynth segment train` arguments for SEG_SETTINGS."""
    return ["segment", "train", str(data), "--out", str(out), *sets(SEG_SETTINGS), *extra]


def in_process(cls: type, settings: dict[str, str], **paths: str):
    """The stage config the CLI builds from `settings` (same parsing of the --set values)."""
    from todsynth.config import load_config, parse_overrides

    return load_config(cls, None, {**paths, **parse_overrides([f"{k}={v}" for k, v in settings.items()])})


def assert_equal_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """Same keys and exactly equal tensors."""
    assert a.keys() == b.keys()
    unequal = [k for k in a if not torch.equal(a[k], b[k])]
    assert not unequal, f"tensors differ: {unequal[:5]}"


def finish(app, args: list[str]) -> str:
    """The last, uninterrupted run after the kills (in-process, one thread); returns its output."""
    result = invoke(app, args)
    assert result.exit_code == 0, (result.output[-3000:], result.exception)
    return result.output


def report(name: str, log: KillLog, lost: int) -> None:
    """Print the numbers of a kill test (shown with pytest -rA / -s)."""
    print(f"{name}: kills={log.kills} delays={log.delays} files_checked={log.files_checked} bytes_lost={lost}")


def reference_run(train, cls: type, settings: dict[str, str], data: Path, out: Path) -> Path:
    """One uninterrupted training run (in-process, one thread): what the killed-and-resumed run must equal."""
    with torch_threads(1):
        train(in_process(cls, settings, data=str(data), out=str(out)))
    return out


@pytest.fixture(scope="module")
def references(toy_masks_16: Path, synth_reference: dict[str, bytes], tmp_path_factory) -> dict[str, object]:
    """The uninterrupted in-process runs: generator and segmenter run folders, the synthesized files."""
    from todsynth.generator.train import GeneratorTrainConfig, train_generator
    from todsynth.segment.train import SegmentTrainConfig, train_segmenter

    root = tmp_path_factory.mktemp("refs")
    return {
        "generator": reference_run(train_generator, GeneratorTrainConfig, GEN_SETTINGS, toy_masks_16, root / "gen"),
        "segmenter": reference_run(train_segmenter, SegmentTrainConfig, SEG_SETTINGS, toy_masks_16, root / "seg"),
        "synthesis": synth_reference,
    }


def model_files(rel: Path) -> bool:
    """The saved model folder: outputs that must be byte-equal after resuming."""
    return rel.parts[0] == "model"


def metadata(path: Path) -> dict[str, str]:
    """The metadata of a safetensors file (its order in the header follows a Rust hash map: not stable)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.metadata()


def metric_lines(run: Path) -> list[dict]:
    """metrics.jsonl without what differs between runs (throughput)."""
    return [
        {k: v for k, v in r.items() if k != "samples_per_s"}
        for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
    ]


def check_trainer(reference: Path, out: Path) -> int:
    """A resumed training run equals the uninterrupted one: model bytes, state tensors, metrics; returns bytes lost."""
    ref_files, files = file_bytes(reference, model_files), file_bytes(out, model_files)
    assert files.keys() == ref_files.keys() and ref_files
    assert_equal_tensors(
        load_weights(reference / "checkpoint" / "state.safetensors"),
        load_weights(out / "checkpoint" / "state.safetensors"),
    )
    ref_info, info = (json.loads((r / "checkpoint" / "state.json").read_text()) for r in (reference, out))
    assert info["step"] == ref_info["step"] and metric_lines(out) == metric_lines(reference)
    results = [json.loads((r / "results.json").read_text()) for r in (reference, out)]
    for r in results:  # what differs between invocations: time, folders, and --resume itself
        r.pop("wall_time_s"), r.pop("model"), r.get("config", {}).pop("out", None), r.get("config", {}).pop("resume", 0)
    assert results[0] == results[1]
    assert not (out / "checkpoint.tmp").exists() and not (out / "checkpoint.old").exists()
    return bytes_lost(ref_files, files)


TASKS = {  # task: (CLI arguments (data, out, *extra), progress probe of the out folder, kill windows, seed)
    "generator": (gen_args, lambda out: json_step(out / "checkpoint" / "state.json"), [0.8, 0.8], 11),
    "segmenter": (seg_args, lambda out: json_step(out / "checkpoint" / "state.json"), [1.5, 1.5], 12),
    "synthesis": (None, lambda out: len(list((out / ".records").glob("*.json"))), [1.0, 1.0], 13),
}


@pytest.mark.parametrize("task", list(TASKS))
def test_survives_kills(
    task: str, cli_app, toy_masks_16: Path, tiny_generator_dir: Path, references: dict, tmp_path: Path
) -> None:
    """Two SIGKILLs mid-run, then a resume: the output equals one uninterrupted run's, 0 bytes lost."""
    make_args, probe, windows, seed = TASKS[task]
    out = tmp_path / "run"
    if task == "synthesis":
        args = synth_args(tiny_generator_dir, toy_masks_16, out)
        runs = [args, args]
    else:
        args = make_args(toy_masks_16, out, "--resume")
        runs = [make_args(toy_masks_16, out), args]
    log = kill_sequence(runs, out, lambda: probe(out), windows, seed=seed)
    assert log.kills >= 1, log.outputs
    if task == "synthesis":
        done_before = synthesized_before(out)
        output = finish(cli_app, args)
        assert f"synthesized {SYNTH_SAMPLES - done_before} pairs" in output  # only what was missing
        resumed = file_bytes(out, synth_keep)
        lost = bytes_lost(references[task], resumed)
        assert lost == 0 and resumed.keys() == references[task].keys()
        from todsynth.data.check import validate_dataset

        assert validate_dataset(out).n_images == SYNTH_SAMPLES  # temp files are invisible to the readers
    else:
        finish(cli_app, args)
        lost = check_trainer(references[task], out)
        assert lost == 0
    if task == "generator":
        cache, ref_cache = out / "prompt_cache.safetensors", references[task] / "prompt_cache.safetensors"
        assert_equal_tensors(load_weights(ref_cache), load_weights(cache))
        assert metadata(cache) == metadata(ref_cache)
    check_visible_files(out)
    report(task, log, lost)


def synthesized_before(out: Path) -> int:
    """Samples done before the last run (records or manifest lines); leaves what a kill inside a write leaves."""
    records = out / ".records"
    manifest_path = out / "manifest.jsonl"  # a run that completed the folder moved its records there
    lines = manifest_path.read_text().splitlines() if manifest_path.exists() else []
    done = len({p.stem for p in records.glob("*.json")} | {json.loads(line)["id"] for line in lines})
    for sub in ("images", "masks", ".records"):  # what a kill inside a write leaves: readers must skip it
        (out / sub).mkdir(exist_ok=True)  # .records is gone if a run completed the folder before its kill
        (out / sub / ".half_written.png.k1ll3d.tmp").write_bytes(b"\x89PNG\r\n\x1a\n cut")
    return done


def test_segment_resume_never_uses_the_state_of_an_earlier_run(toy_masks_16: Path, tmp_path: Path) -> None:
    """Run A finishes; run B (other lr, --overwrite) in the same folder dies before its first checkpoint; B --resume
    must refuse."""
    from todsynth.errors import CheckpointError
    from todsynth.segment.train import SegmentTrainConfig, train_segmenter

    out = tmp_path / "run"
    settings = {**SEG_SETTINGS, "steps": "2", "checkpoint_every": "5"}
    first = in_process(SegmentTrainConfig, settings, data=str(toy_masks_16), out=str(out))
    second = in_process(
        SegmentTrainConfig, {**settings, "lr": "0.002", "overwrite": "true"}, data=str(toy_masks_16), out=str(out)
    )  # a new run in a folder holding a finished one must say so

    def killed(step: int, loss: float) -> None:
        """Stop the run like a kill would."""
        raise KeyboardInterrupt  # SIGKILL stand-in, after step 1 and before any checkpoint of run B

    with torch_threads(1):
        train_segmenter(first)
        with pytest.raises(KeyboardInterrupt):
            train_segmenter(second, on_step=killed)
        with pytest.raises(CheckpointError):
            train_segmenter(dataclasses.replace(second, overwrite=False, resume=True))


# ---------------------------------------------------------------------------------------------
# Foreign or corrupt checkpoints: refused with exit code 2 and the file named, never a traceback.


def invoke_refused(app, args: list[str], *names: str) -> str:
    """Invoke the CLI in-process; assert exit 2, an 'error:' line naming every `names`, no traceback."""
    result = invoke(app, args)
    assert result.exit_code == 2, (result.exit_code, result.output[-2000:], result.exception)
    assert "error:" in result.output and "Traceback" not in result.output
    for name in names:
        assert name in result.output, result.output
    return result.output


def copy_run(src: Path, dst: Path) -> Path:
    """A copy of a finished run folder to tamper with."""
    shutil.copytree(src, dst)
    return dst


def garbage(path: Path) -> bytes:
    """Overwrite a file with bytes that are not a safetensors file; returns them."""
    data = b"\x80\x04 pickled? no: just garbage" * 10
    path.write_bytes(data)
    return data


@pytest.mark.parametrize("task", ["generator", "segmenter"])
def test_resume_refuses_foreign_and_garbage_checkpoints(
    task: str, cli_app, toy_masks_16: Path, references: dict, tmp_path: Path
) -> None:
    """Other settings, a state.json that is no checkpoint, a garbage state.safetensors and a missing checkpoint are
    refused naming the file, which is left as it is."""
    make_args = TASKS[task][0]
    out = copy_run(references[task], tmp_path / "run")
    info = out / "checkpoint" / "state.json"
    invoke_refused(
        cli_app,
        make_args(toy_masks_16, out, "--resume", "--set", "lr=0.01"),
        str(info),
        "other settings",
        "lr: 0.001 -> 0.01",
    )
    for text, words in (('{"step": 4, "hist', "not valid JSON"), ("[1, 2]", "not a todsynth checkpoint")):
        original = info.read_text()
        info.write_text(text)
        invoke_refused(cli_app, make_args(toy_masks_16, out, "--resume"), str(info), words)
        assert info.read_text() == text
        info.write_text(original)
    data = garbage(out / "checkpoint" / "state.safetensors")
    invoke_refused(
        cli_app, make_args(toy_masks_16, out, "--resume"), str(out / "checkpoint" / "state.safetensors"), "safetensors"
    )
    assert (out / "checkpoint" / "state.safetensors").read_bytes() == data
    empty = tmp_path / "empty"
    invoke_refused(cli_app, make_args(toy_masks_16, empty, "--resume"), "no checkpoint", "without --resume")
    assert not empty.exists()


def test_synthesize_refuses_a_foreign_or_corrupt_folder(
    cli_app, tiny_generator_dir: Path, toy_masks_16: Path, tmp_path: Path
) -> None:
    """Other settings name synthesize.json; a corrupt record file is named when the manifest is gathered."""
    out = tmp_path / "synth"
    args = [
        "synthesize",
        str(tiny_generator_dir),
        str(toy_masks_16),
        str(out),
        "--crfm-steps",
        "0",
        "--num-steps",
        "1",
        "--set",
        "limit=1",
    ]
    assert invoke(cli_app, args).exit_code == 0
    invoke_refused(cli_app, [*args, "--seed", "3"], str(out / "synthesize.json"), "other settings", "seed: 0 -> 3")
    record = out / ".records" / "cut.json"  # records go once the folder is complete: a leftover one is read
    record.parent.mkdir(exist_ok=True)
    record.write_text('{"id": "cut sho')
    invoke_refused(cli_app, args, str(record), "not valid JSON")
    assert not [p for p in out.rglob("*") if is_temp(p)]
