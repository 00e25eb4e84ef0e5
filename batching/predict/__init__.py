"""Predicting and judging, the fourth floor of the lab.

Each row is priced op by op from measured rates. A three-limit fit gives each run its knee.
What-ifs price the rows on other devices. Each of the post's claims gets a verdict."""
