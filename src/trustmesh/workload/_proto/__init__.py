"""Generated code for the SPIFFE Workload API (``workload.proto``); see ``generate.py``."""
