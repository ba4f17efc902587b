"""Concurrency: two `synthesize` processes on one output folder make every sample once, byte-equal to one run."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
from pathlib import Path

import pytest

from todsynth.data.classes import LOVEDA
from todsynth.synthesize import CLAIMS, RECORDS, OutputFolder, WorkItem

from reliability_helpers import (
    CLI,
    PROCESS_TIMEOUT_S,
    SYNTH_SAMPLES,
    bytes_lost,
    check_visible_files,
    cli_env,
    file_bytes,
    synth_args,
    synth_keep,
    torch_threads,
)


def test_two_processes_on_one_folder(
    tiny_generator_dir: Path, toy_masks_16: Path, synth_reference: dict[str, bytes], tmp_path: Path
) -> None:
    """Started together with the same settings: no sample made twice, files equal a single run, manifest once each."""
    out = tmp_path / "shared"
    args = synth_args(tiny_generator_dir, toy_masks_16, out)
    procs = [
        subprocess.Popen(CLI + args, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    results = [p.communicate(timeout=PROCESS_TIMEOUT_S) + (p.returncode,) for p in procs]
    for _, stderr, code in results:
        assert code == 0, stderr[-3000:]
    made = [int(re.search(r"synthesized (\d+) pairs", stdout).group(1)) for stdout, _, _ in results]
    assert sum(made) == SYNTH_SAMPLES, made  # the claims split the work: nothing generated twice
    final = file_bytes(out, synth_keep)
    assert bytes_lost(synth_reference, final) == 0 and final.keys() == synth_reference.keys()
    ids = [json.loads(line)["id"] for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert len(ids) == len(set(ids)) == SYNTH_SAMPLES
    assert check_visible_files(out) >= 2 * SYNTH_SAMPLES
    print(f"two processes: made {made}, bytes_lost=0")


def test_a_claim_is_never_visible_without_its_owner(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A process starting while another is mid-claim must not release that claim (it would make the item twice)."""
    first, second = OutputFolder(tmp_path / "o", LOVEDA), OutputFolder(tmp_path / "o", LOVEDA)
    item = WorkItem(0, "tile", "identity", 0)
    real_hostname = socket.gethostname

    def other_process_starts() -> str:
        """gethostname, with a second process starting in the middle of the claim."""
        second.release_stale_claims()  # what a second run does on start, interleaved with the claim
        return real_hostname()

    monkeypatch.setattr(socket, "gethostname", other_process_starts)
    assert first.claim(item)
    monkeypatch.undo()
    lock = tmp_path / "o" / CLAIMS / f"{item.id}.lock"
    assert lock.read_text().endswith(f":{os.getpid()}")
    assert second.release_stale_claims() == 0 and not second.claim(item)


def test_manifest_is_never_partial(tiny_generator_dir: Path, toy_masks_16: Path, tmp_path: Path) -> None:
    """A run that ends while another live process still holds a claim leaves the manifest to that process."""
    from todsynth.synthesize import build_synthesize_config, synthesize

    out = tmp_path / "o"
    cfg = build_synthesize_config(
        {
            "generator": str(tiny_generator_dir),
            "masks": str(toy_masks_16),
            "out": str(out),
            "num_steps": 1,
            "copies": 2,
            "crfm.steps": 0,
            "limit": 1,
        }
    )
    (out / CLAIMS).mkdir(parents=True)
    with torch_threads(1):
        source = synthesize(cfg, progress=False)  # learn the item ids, then start over with one held by "another"
        records = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
        held = next(r["id"] for r in records if r["id"].endswith("__k1"))
        for path in out.rglob("*"):
            if path.is_file() and held in path.name:
                path.unlink()
        (out / "manifest.jsonl").unlink()  # back to mid-run: the other sample done (its record), no manifest
        (out / RECORDS).mkdir()
        (out / CLAIMS).mkdir()
        for record in records:
            if record["id"] != held:
                (out / RECORDS / f"{record['id']}.json").write_text(json.dumps(record))
        (out / CLAIMS / f"{held}.lock").write_text(f"{socket.gethostname()}:{os.getpid()}")  # alive: this process
        partial = synthesize(cfg, progress=False)
        assert source.made == 2 and partial.made == 0
        assert not (out / "manifest.jsonl").exists(), "a manifest missing a sample was written"
        (out / CLAIMS / f"{held}.lock").unlink()  # the other process ends without finishing: its claim goes
        finished = synthesize(cfg, progress=False)
    lines = (out / "manifest.jsonl").read_text().splitlines()
    assert finished.made == 1 and len(lines) == 2 == finished.in_manifest


def test_a_record_removed_by_another_finish_stays_in_the_manifest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Two processes finishing together: the other one writes its manifest and removes the records while this one
    lists them; the merge skips the vanished record (no error) and still lists it, read from that manifest."""
    import todsynth.io

    folder = OutputFolder(tmp_path / "o", LOVEDA)
    record = {"id": "a", "image": "images/a.png"}
    (folder.root / RECORDS).mkdir(parents=True, exist_ok=True)
    (folder.root / RECORDS / "a.json").write_text(json.dumps(record))
    real_read = todsynth.io.read_json

    def other_process_finishes(path):
        """read_json, with the other process's finish() running just before this record is read."""
        (folder.root / "manifest.jsonl").write_text(json.dumps(record) + "\n")
        Path(path).unlink()
        return real_read(path)

    monkeypatch.setattr(todsynth.io, "read_json", other_process_finishes)
    assert folder.write_manifest() == 1
    monkeypatch.undo()
    assert [json.loads(line)["id"] for line in (folder.root / "manifest.jsonl").read_text().splitlines()] == ["a"]
