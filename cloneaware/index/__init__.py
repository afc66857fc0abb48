"""The sharing index: extent flags, the plan (pure numpy), and ``scan``."""
