"""Predicting and judging, the fourth floor: each row priced op by op from measured rates,
the three-limit fit and its knee, what-ifs on other devices, and a verdict per claim."""
