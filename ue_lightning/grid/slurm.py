"""The callable a SLURM job runs (imported only with ``--executor slurm``: submitit is an optional extra)."""

from __future__ import annotations

from submitit.helpers import Checkpointable

from ue_lightning.grid.spec import Stage


class StageJob(Checkpointable):
    """Run one grid stage; on preemption or timeout submitit requeues the same call, which resumes
    from the stage's ``checkpoints/last.ckpt`` (``Checkpointable.checkpoint`` resubmits it as it was)."""

    def __call__(self, stage: Stage) -> None:
        from ue_lightning.grid.stages import run_stage

        run_stage(stage)
