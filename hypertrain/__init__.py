"""hypertrain: train hypernetworks (HART, HyperTuning, PHA) that write PEFT weights for a frozen T5."""

__version__ = "0.1.0"
