"""Outputs, the top floor of the package.

It writes down what the floors below measured and predicted. That means the rows on disk,
the run summaries, TensorBoard events, the figures and the report.
"""
