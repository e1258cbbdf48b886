"""The flight recorder (docs/ARCHITECTURE.md, Flight recorder): recorder.py keeps each rank's last collectives
and point-to-point operations and dumps them to <run_dir>/flight/rank<R>.json; analyze.py lines the ranks'
dumps up and names the first operation they disagree on (`wb debug hang`)."""
