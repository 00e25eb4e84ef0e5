"""Outputs, the top floor: the rows on disk, run summaries, TensorBoard, figures and the
report, from what the floors below measured and predicted."""
