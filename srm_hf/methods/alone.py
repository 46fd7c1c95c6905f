"""The student trained alone: cross-entropy with the labels, no teacher forward. The baseline every method must beat."""

from ..losses import classification_loss
from .base import Method, StageSpec


class Alone(Method):
    name = "alone"

    def stages(self) -> list[StageSpec]:
        return [StageSpec("ce", uses_teacher=False)]

    def loss(self, stage, student, teacher, labels):
        if labels is None:
            raise ValueError("method='alone' trains on class labels: the batches need a 'labels' column.")
        return {"ce": classification_loss(student.logits, labels, self.label_smoothing)}
