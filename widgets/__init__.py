"""Layer 4: Jupyter front ends for chemfit (import name ``chemfit_widgets``).

Needs the ``jupyter`` extra (ipywidgets, ipympl, matplotlib). The core ``chemfit`` package never
imports this one.
"""
