"""The `todsynth` command: a thin typer layer over the Python API (heavy imports happen inside commands)."""
