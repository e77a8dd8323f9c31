"""Published numbers as data: one CSV per paper table source (read by prunebench.report.reference)."""
