"""The floor every stage stands on: hardware, processes, atomic writes, the run directory. Imports nothing above it."""
