"""The worker loop's resume rule, without DeepSpeed or Ray: which phase a fit starts at, whether it
resumes from the checkpoint, whether Ray restarted it, and a phase whose final checkpoint exists."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from raycat.config import LoraSettings, PhaseConfig
from raycat.train.loop import LoopConfig, ResumePoint, resume_point

FIT = "fit-now"


def _phase(root: Path, name: str, phase_hash: str) -> LoopConfig:
    phase_dir = root / name
    return LoopConfig(
        student_path=str(root / "student"),
        student_revision=None,
        trust_remote_code=False,
        init_model=None,
        init_adapter=None,
        model_dir=str(phase_dir / "model"),
        phase_dir=str(phase_dir),
        phase_hash=phase_hash,
        phase_settings={},
        info={},
        method="lora",
        lora=LoraSettings(),
        zero_stage=2,
        offload_optimizer=False,
        offload_param=False,
        bf16=False,
        device="cpu",
        threads=1,
        batching="packed",
        gradient_checkpointing=False,
        recipe="curriculum",
        phase_name=name,
        phase=PhaseConfig(),
        total_steps=10,
        pad_id=0,
        seed=0,
        feed_layout={"version": 1, "read_tasks": 1, "read_spans": "s", "world": 1},
        save_steps=2,
        log_every_steps=1,
        tracking="none",
        tracking_uri=None,
        tracking_project="raycat",
    )


def _record(phase: LoopConfig, phase_hash: str | None = None) -> None:
    """done.json as rank 0 writes it when the phase ends."""
    Path(phase.phase_dir).mkdir(parents=True, exist_ok=True)
    (Path(phase.phase_dir) / "done.json").write_text(json.dumps({"hash": phase_hash or phase.phase_hash}))


@pytest.fixture
def phases(tmp_path) -> list[LoopConfig]:
    return [_phase(tmp_path, f"phase{i}", f"h{i}") for i in (1, 2, 3)]


def test_no_checkpoint_starts_at_the_first_phase(phases):
    assert resume_point(phases, None, FIT) == ResumePoint(start=0, from_checkpoint=False, restarted=False)


def test_a_checkpoint_in_phase2_resumes_it_when_phase1_is_recorded(phases):
    _record(phases[0])
    point = resume_point(phases, {"phase": "phase2", "fit_id": "an-earlier-fit"}, FIT)
    assert point == ResumePoint(start=1, from_checkpoint=True, restarted=False, finished=None)


def test_ray_restarting_this_fit_is_told_apart_from_a_rerun(phases):
    _record(phases[0])
    assert resume_point(phases, {"phase": "phase2", "fit_id": FIT}, FIT).restarted
    assert not resume_point(phases, {"phase": "phase2"}, FIT).restarted


def test_a_phase_before_the_checkpoint_retrained_since_starts_the_fit_over(phases):
    # Phase 1's done.json holds another config's hash: the checkpoint chains a stale phase 1.
    _record(phases[0], "someone-else")
    point = resume_point(phases, {"phase": "phase2", "fit_id": FIT}, FIT)
    assert point == ResumePoint(start=0, from_checkpoint=False, restarted=True, finished=None)
    # Phase 1 never recorded at all: the same.
    (Path(phases[0].phase_dir) / "done.json").unlink()
    assert resume_point(phases, {"phase": "phase3"}, FIT).start == 0


def test_a_final_checkpoint_moves_on_to_the_next_phase_and_names_the_one_to_record(phases):
    _record(phases[0])
    point = resume_point(phases, {"phase": "phase2", "final": True, "wall_s": 3.0}, FIT)
    assert point == ResumePoint(start=2, from_checkpoint=False, restarted=False, finished=1)
    # The last phase's final checkpoint: nothing is left to train, only its records.
    _record(phases[1])
    last = resume_point(phases, {"phase": "phase3", "final": True, "wall_s": 3.0}, FIT)
    assert (last.start, last.finished) == (3, 2)


def test_a_checkpoint_of_a_phase_not_in_this_fit_starts_over(phases):
    assert resume_point(phases[1:], {"phase": "phase1", "fit_id": FIT}, FIT) == ResumePoint(restarted=True)


def test_a_checkpoint_without_a_phase_name_holds_the_fits_last_phase(phases):
    # Written before phases shared a worker group: a fit then trained one phase.
    _record(phases[0])
    _record(phases[1])
    assert resume_point(phases, {"fit_id": "old"}, FIT) == ResumePoint(start=2, from_checkpoint=True)
    assert resume_point(phases[:1], {}, FIT) == ResumePoint(start=0, from_checkpoint=True)


def test_the_last_step_reaches_the_tracker_even_off_the_logging_interval(tmp_path, monkeypatch, capsys):
    """The demo's phase 1 trains 8 steps with log_every_steps=10: its tracker run got no loss at all."""
    import dataclasses

    import ray.train

    from raycat.train.loop import PhaseRun

    reported, logged = [], []
    monkeypatch.setattr(ray.train, "report", lambda metrics, **kw: reported.append(metrics["step"]))
    run = object.__new__(PhaseRun)
    run.cfg = dataclasses.replace(_phase(tmp_path, "phase1", "h"), log_every_steps=10, save_steps=100, total_steps=8)
    run.rank, run.log = 0, lambda metrics, step: logged.append(step)
    for step in range(1, 9):
        run._report({"step": step, "epoch": 0, "loss": 1.0, "lr": 0.1, "tokens_per_s": 5.0}, done=step == 8)
    assert logged == [8]
    assert "step 8/8" in capsys.readouterr().out
    assert reported == []  # the final step's report is save_checkpoint(final=True)'s
