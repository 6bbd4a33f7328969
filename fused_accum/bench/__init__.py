"""The benchmark suite behind ``python -m fused_accum bench``: kernel sweeps and whole
windows on real parameter-shape lists, against PyTorch measured in the same run, with
the byte model of DESIGN.md, written as CSV and PNG."""
