"""Kill anywhere: SIGKILLed `generator train`, `segment train` and `synthesize` resume to the uninterrupted result.

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

GEN_SETTINGS: dict[str, str] = {"steps": "40", "batch_size": "2", "size": "16", "num_layers": "1", "num_heads": "2",
                                "head_dim": "8", "val_every": "0", "text_max_length": "8", "progress": "false",
                                "warmup_steps": "2", "checkpoint_every": "1", "full_state_every": "1",
                                "ema_decay": "0.9", "lr": "0.001"}
SEG_SETTINGS: dict[str, str] = {"arch": "segformer", "encoder": "tu-mobilenetv3_small_050", "size": "16",
                                "steps": "24", "batch_size": "2", "device": "cpu", "checkpoint_every": "1",
                                "log_every": "1", "lr": "0.001"}


def sets(settings: dict[str, str]) -> list[str]:
    """`--set key=value` arguments."""
    return [x for k, v in settings.items() for x in ("--set", f"{k}={v}")]


def gen_args(data: Path, out: Path, *extra: str) -> list[str]:
    """`todsynth generator train` arguments for GEN_SETTINGS."""
    return ["generator", "train", str(data), "--out", str(out), *sets(GEN_SETTINGS), *extra]


def seg_args(data: Path, out: Path, *extra: str) -> list[str]:
    """`todsynth segment train` arguments for SEG_SETTINGS."""
    return ["segment", "train", "--data", str(data), "--out", str(out), *sets(SEG_SETTINGS), *extra]


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
def generator_reference(toy_masks_16: Path, tmp_path_factory) -> Path:
    """An uninterrupted generator training run."""
    from todsynth.generator.train import GeneratorTrainConfig, train_generator

    return reference_run(train_generator, GeneratorTrainConfig, GEN_SETTINGS, toy_masks_16,
                         tmp_path_factory.mktemp("gen_ref") / "run")


@pytest.fixture(scope="module")
def segment_reference(toy_masks_16: Path, tmp_path_factory) -> Path:
    """An uninterrupted segmenter training run."""
    from todsynth.segment.train import SegmentTrainConfig, train_segmenter

    return reference_run(train_segmenter, SegmentTrainConfig, SEG_SETTINGS, toy_masks_16,
                         tmp_path_factory.mktemp("seg_ref") / "run")


def model_files(rel: Path) -> bool:
    """The saved model folder: outputs that must be byte-equal after resuming."""
    return rel.parts[0] == "model"


def metadata(path: Path) -> dict[str, str]:
    """The metadata of a safetensors file (its order in the header follows a Rust hash map: not stable)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.metadata()


def test_generator_train_survives_kills(cli_app, toy_masks_16: Path, generator_reference: Path,
                                        tmp_path: Path) -> None:
    """Two SIGKILLs mid-training, then --resume: byte-equal model, equal checkpoint tensors and loss trace."""
    out = tmp_path / "run"
    runs = [gen_args(toy_masks_16, out), gen_args(toy_masks_16, out, "--resume")]
    log = kill_sequence(runs, out, lambda: json_step(out / "checkpoint" / "state.json"), [0.8, 0.8], seed=11)
    assert log.kills >= 1, log.outputs
    finish(cli_app, gen_args(toy_masks_16, out, "--resume"))
    reference, resumed = file_bytes(generator_reference, model_files), file_bytes(out, model_files)
    lost = bytes_lost(reference, resumed)
    assert len(reference) == 3 and lost == 0 and resumed.keys() == reference.keys()
    cache, ref_cache = out / "prompt_cache.safetensors", generator_reference / "prompt_cache.safetensors"
    assert_equal_tensors(load_weights(ref_cache), load_weights(cache))
    assert metadata(cache) == metadata(ref_cache)
    assert_equal_tensors(load_weights(generator_reference / "checkpoint" / "state.safetensors"),
                         load_weights(out / "checkpoint" / "state.safetensors"))
    ref_info = json.loads((generator_reference / "checkpoint" / "state.json").read_text())
    info = json.loads((out / "checkpoint" / "state.json").read_text())
    assert info["step"] == ref_info["step"] == 40 and info["history"] == ref_info["history"]
    assert not (out / "checkpoint.tmp").exists() and not (out / "checkpoint.old").exists()
    check_visible_files(out)
    report("generator train", log, lost)


def test_segment_train_survives_kills(cli_app, toy_masks_16: Path, segment_reference: Path, tmp_path: Path) -> None:
    """Two SIGKILLs mid-training, then --resume: byte-equal model, equal checkpoint tensors and results."""
    out = tmp_path / "run"
    runs = [seg_args(toy_masks_16, out), seg_args(toy_masks_16, out, "--resume")]
    log = kill_sequence(runs, out, lambda: json_step(out / "checkpoint" / "step.json"), [1.5, 1.5], seed=12)
    assert log.kills >= 1, log.outputs
    finish(cli_app, seg_args(toy_masks_16, out, "--resume"))
    reference, resumed = file_bytes(segment_reference / "model"), file_bytes(out / "model")
    lost = bytes_lost(reference, resumed)
    assert set(reference) == {"config.json", "model.safetensors"} and lost == 0
    assert_equal_tensors(load_weights(segment_reference / "checkpoint" / "state.safetensors"),
                         load_weights(out / "checkpoint" / "state.safetensors"))

    def comparable(path: Path) -> dict:
        """results.json without what differs between runs (timing, paths)."""
        results = json.loads(path.read_text())
        results["config"].pop("out")
        return {k: v for k, v in results.items() if k not in ("wall_time_s", "model")}

    assert comparable(out / "results.json") == comparable(segment_reference / "results.json")
    assert comparable(out / "results.json")["steps"] == 24
    check_visible_files(out)
    report("segment train", log, lost)


def test_synthesize_survives_kills(cli_app, tiny_generator_dir: Path, toy_masks_16: Path,
                                   synth_reference: dict[str, bytes], tmp_path: Path) -> None:
    """Two SIGKILLs mid-synthesis, then a rerun: every file byte-equal to one uninterrupted run."""
    out = tmp_path / "synth"
    args = synth_args(tiny_generator_dir, toy_masks_16, out)
    records = out / ".records"
    log = kill_sequence([args, args], out, lambda: len(list(records.glob("*.json"))), [1.0, 1.0], seed=13)
    assert log.kills >= 1, log.outputs
    manifest_path = out / "manifest.jsonl"  # a run that completed the folder moved its records there
    lines = manifest_path.read_text().splitlines() if manifest_path.exists() else []
    listed = [json.loads(line)["id"] for line in lines]
    done_before = len({p.stem for p in records.glob("*.json")} | set(listed))
    for sub in ("images", "masks", ".records"):  # what a kill inside a write leaves: readers must skip it
        (out / sub).mkdir(exist_ok=True)  # .records is gone if a run completed the folder before its kill
        (out / sub / ".half_written.png.k1ll3d.tmp").write_bytes(b"\x89PNG\r\n\x1a\n cut")
    output = finish(cli_app, args)
    assert f"synthesized {SYNTH_SAMPLES - done_before} pairs" in output  # only what was missing
    resumed = file_bytes(out, synth_keep)
    lost = bytes_lost(synth_reference, resumed)
    assert lost == 0 and resumed.keys() == synth_reference.keys()
    manifest = (out / "manifest.jsonl").read_text().splitlines()
    assert len(manifest) == len({json.loads(line)["id"] for line in manifest}) == SYNTH_SAMPLES
    from todsynth.data.check import validate_dataset

    assert validate_dataset(out).n_images == SYNTH_SAMPLES  # temp files are invisible to the readers
    check_visible_files(out)
    report("synthesize", log, lost)


def test_segment_resume_never_uses_the_state_of_an_earlier_run(toy_masks_16: Path, tmp_path: Path) -> None:
    """Run A finishes; run B (other lr, --overwrite) in the same folder dies before its first checkpoint; B --resume
    must refuse."""
    from todsynth.errors import CheckpointError
    from todsynth.segment.train import SegmentTrainConfig, train_segmenter

    out = tmp_path / "run"
    settings = {**SEG_SETTINGS, "steps": "2", "checkpoint_every": "5"}
    first = in_process(SegmentTrainConfig, settings, data=str(toy_masks_16), out=str(out))
    second = in_process(SegmentTrainConfig, {**settings, "lr": "0.002", "overwrite": "true"}, data=str(toy_masks_16),
                        out=str(out))  # a new run in a folder holding a finished one must say so

    def killed(step: int, loss: float) -> None:
        """Stop the run like a kill would."""
        raise KeyboardInterrupt  # SIGKILL stand-in, after step 1 and before any checkpoint of run B

    with torch_threads(1):
        train_segmenter(first)
        with pytest.raises(KeyboardInterrupt):
            train_segmenter(second, on_step=killed)
        with pytest.raises(CheckpointError):
            train_segmenter(dataclasses.replace(second, overwrite=False), resume=True)


def test_generator_resume_after_a_kill_between_the_checkpoint_renames(toy_masks_16: Path, tmp_path: Path) -> None:
    """Killed after `checkpoint` became `checkpoint.old` but before the new one was renamed in: --resume uses .old."""
    from todsynth.generator import train as gtrain

    out = tmp_path / "run"
    settings = {**GEN_SETTINGS, "steps": "4", "checkpoint_every": "2"}
    with torch_threads(1):
        gtrain.train_generator(in_process(gtrain.GeneratorTrainConfig, {**settings, "stop_after": "2"},
                                          data=str(toy_masks_16), out=str(out)))
        (out / "checkpoint").rename(out / "checkpoint.old")
        restored: list[int] = []
        original = gtrain._restore

        def spy(*args: object, **kw: object) -> tuple[int, dict]:
            """The real _restore, recording the step it restored."""
            step, history = original(*args, **kw)
            restored.append(step)
            return step, history

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(gtrain, "_restore", spy)
            gtrain.train_generator(in_process(gtrain.GeneratorTrainConfig, {**settings, "resume": "true"},
                                              data=str(toy_masks_16), out=str(out)))
    assert restored == [2]
    assert json_step(out / "checkpoint" / "state.json") == 4 and not (out / "checkpoint.old").exists()


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


def test_generator_resume_refuses_a_garbage_checkpoint(cli_app, toy_masks_16: Path, generator_reference: Path,
                                                        tmp_path: Path) -> None:
    """A corrupt state.safetensors is named and left as it is."""
    out = copy_run(generator_reference, tmp_path / "run")
    data = garbage(out / "checkpoint" / "state.safetensors")
    invoke_refused(cli_app, gen_args(toy_masks_16, out, "--resume"), str(out / "checkpoint" / "state.safetensors"),
                   "safetensors")
    assert (out / "checkpoint" / "state.safetensors").read_bytes() == data


@pytest.mark.parametrize("state", ["other-config", "not-json", "no-step"])
def test_generator_resume_refuses_a_foreign_state_json(cli_app, toy_masks_16: Path, generator_reference: Path,
                                                        tmp_path: Path, state: str) -> None:
    """A state.json of another configuration (or not a checkpoint at all) is named with what to do."""
    out = copy_run(generator_reference, tmp_path / "run")
    path = out / "checkpoint" / "state.json"
    info = json.loads(path.read_text())
    info["config"]["num_layers"] = 3
    text = {"other-config": json.dumps(info), "not-json": '{"step": 4, "hist', "no-step": "[1, 2]"}[state]
    path.write_text(text)
    words = {"other-config": "num_layers", "not-json": "not valid JSON", "no-step": "not a todsynth checkpoint"}
    output = invoke_refused(cli_app, gen_args(toy_masks_16, out, "--resume"), str(path), words[state])
    assert "(" in output and path.read_text() == text


def test_segment_resume_refuses_foreign_and_garbage_checkpoints(cli_app, toy_masks_16: Path,
                                                                 segment_reference: Path, tmp_path: Path) -> None:
    """Resuming with other settings names run.json; a garbage state.safetensors is named."""
    out = copy_run(segment_reference, tmp_path / "run")
    invoke_refused(cli_app, seg_args(toy_masks_16, out, "--resume", "--set", "lr=0.01"),
                   str(out / "checkpoint" / "run.json"), "lr")
    garbage(out / "checkpoint" / "state.safetensors")
    invoke_refused(cli_app, seg_args(toy_masks_16, out, "--resume"), str(out / "checkpoint" / "state.safetensors"))
    empty = tmp_path / "empty"
    invoke_refused(cli_app, seg_args(toy_masks_16, empty, "--resume"), "no checkpoint", "without resume")
    assert not (empty / "checkpoint" / "state.safetensors").exists()


def test_synthesize_refuses_a_foreign_or_corrupt_folder(cli_app, tiny_generator_dir: Path, toy_masks_16: Path,
                                                        tmp_path: Path) -> None:
    """Other settings name synthesize.json; a corrupt record file is named when the manifest is gathered."""
    out = tmp_path / "synth"
    args = ["synthesize", str(tiny_generator_dir), str(toy_masks_16), str(out), "--crfm-steps", "0",
            "--num-steps", "1", "--set", "limit=1"]
    assert invoke(cli_app, args).exit_code == 0
    invoke_refused(cli_app, [*args, "--seed", "3"], str(out / "synthesize.json"), "other settings")
    record = out / ".records" / "cut.json"  # records go once the folder is complete: a leftover one is read
    record.parent.mkdir(exist_ok=True)
    record.write_text('{"id": "cut sho')
    invoke_refused(cli_app, args, str(record), "not valid JSON")
    assert not [p for p in out.rglob("*") if is_temp(p)]
