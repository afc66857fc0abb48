"""The sharing index: the plan (index/plan.py, pure numpy) over the extent
maps of source/mapping.py."""
