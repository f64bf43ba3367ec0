"""Every figure of the lab, the tour's drawings, the notebook widgets and the sweep report.

==================  =================================================================================
``style``           shared colours, axis titles with units (``label``), the figure layout
``plots``           results-table figures: metric vs parameter, training history, latency vs batch
``figures``         ablation-notebook figures with seed spread (variants, paired deltas, cost curves)
``bench``           the inference benchmark's figure (the UltraMem paper's Figure 1 on this machine)
``tour``            the guided tour's computations: one token through MoE, PKM, TDQKR and IVE
``tour_plots``      the tour's drawings, and the tour saved as a run directory
``widgets``         ipywidgets controllers: the tour's sliders, the results explorer
``report``          the static sweep report (one offline HTML folder)
==================  =================================================================================

Imports go one way: ``style`` <- ``plots``, ``figures``, ``bench``, ``tour_plots``; ``tour`` <-
``tour_plots`` <- ``widgets``. The producers of tables (``labcore.bench``, the experiment modules)
import viz to draw them; viz imports none of them (``figures`` uses the statistics of
``labcore.experiments.core``), and ``tests/viz/test_imports.py`` checks that no import cycle runs
through viz. This file imports nothing, so that ``import labcore.viz.report`` does not pull in
ipywidgets.
"""
