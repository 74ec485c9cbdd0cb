"""The sizes of the micro-family zoos and the targets their models must meet: what `mergewise zoo
build --size` offers, known without importing the builders (which import the evaluation that reads
zoos)."""

from __future__ import annotations

from dataclasses import dataclass

from mergewise.zoo.training import Schedule


@dataclass(frozen=True)
class MicroScale:
    """Everything that sets the size and cost of a micro-family zoo."""

    hidden_size: int
    layers: int
    heads: int
    intermediate_size: int
    pretrain: Schedule
    pretrain_sequence_length: int
    task_share: float  # fraction of pretraining rows that are task formats with random answers
    finetune: Schedule
    general_train_chars: int
    general_eval_chars: int
    train_examples: int
    eval_examples: int
    calibration_examples: int
    max_positions: int = 128


EXPERT_TARGET = 0.9  # every expert solves its own task
BASE_CEILING = 0.2  # …and the base does not

MICRO_SCALES = {
    "micro": MicroScale(
        hidden_size=128,
        layers=4,
        heads=4,
        intermediate_size=256,
        pretrain=Schedule(steps=700, batch_size=32, learning_rate=3e-3, warmup_steps=50),
        pretrain_sequence_length=64,
        task_share=0.3,
        finetune=Schedule(steps=150, batch_size=64, learning_rate=5e-4, warmup_steps=10),
        general_train_chars=2_000_000,
        general_eval_chars=50_000,
        train_examples=4000,
        eval_examples=200,
        calibration_examples=100,
    ),
    # Test-sized: checks the folder contract in seconds; its models learn nothing useful.
    "tiny": MicroScale(
        hidden_size=32,
        layers=2,
        heads=2,
        intermediate_size=64,
        pretrain=Schedule(steps=20, batch_size=8, learning_rate=3e-3, warmup_steps=5),
        pretrain_sequence_length=32,
        task_share=0.3,
        finetune=Schedule(steps=10, batch_size=8, learning_rate=1e-3, warmup_steps=2),
        general_train_chars=20_000,
        general_eval_chars=2_000,
        train_examples=100,
        eval_examples=16,
        calibration_examples=16,  # the Mediator router needs 16 per task
    ),
}
