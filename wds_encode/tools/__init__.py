"""What looks at an output afterwards: status (its state from the records), inspect (counts, statistics,
scale factor; inspect_plot draws them), verify (decode back and compare with the sources)."""
