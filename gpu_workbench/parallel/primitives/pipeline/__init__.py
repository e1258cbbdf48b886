"""Pipeline machinery for the `pipeline` recipe (parallel/recipes/pipeline.py): stage modules and span
recording (stages.py), the schedule simulator (schedule.py), the measured bubble (bubble.py) and the
Gantt chart (gantt.py)."""
