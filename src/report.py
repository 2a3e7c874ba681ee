"""Summarise a sweep: `python src/report.py outputs/train/multiruns/<sweep>` (summary.csv, summary.md, curves.png)."""

from rnnlm.commands.report import main

if __name__ == "__main__":
    main()
