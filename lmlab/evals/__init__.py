"""A run scored: the loss of a split, multiple-choice tasks, answers judged by another model."""
