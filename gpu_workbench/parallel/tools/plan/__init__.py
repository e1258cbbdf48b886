"""`wb plan`: which layouts of a model fit a number of GPUs, and how fast each would run (docs/ARCHITECTURE.md,
Dry runs). hardware.py: the machine; layouts.py: the candidates and the memory check; estimate.py: the step time;
validate.py: the estimate beside published runs."""
