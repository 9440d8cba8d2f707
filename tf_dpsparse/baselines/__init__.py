"""Research baselines: other methods, reproduced to compare ours against.

Not package API and not covered by DESIGN.md's contract: these modules exist
so that `tf-dpsparse bench` (the paper's comparison table) runs from any
install, editable or not, and they may change whenever the comparison does.

- `paper_table`: the table itself; `tf-dpsparse bench` is its `main`.
- `dssgd`: DSSGD (Shokri & Shmatikov, CCS 2015), selective parameter sharing
  with the sparse vector technique, as we read the paper.
- `tff_baselines`: TFF's own FedAvg, DP-FedAvg and 8-bit compression behind
  the process interface `simulation.run` drives.

Importing this package imports nothing heavy: `paper_table` parses and
checks its flags without TensorFlow, and loads the methods when it runs them.
"""
