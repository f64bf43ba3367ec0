"""The lab's experiments: the logic behind the ablation notebooks (each notebook calls one module).

=====================  ==========================================  ==============================
notebook               module                                      question
=====================  ==========================================  ==============================
01_tdqkr               :mod:`labcore.experiments.tdqkr`            additive vs Tucker retrieval
02_layer_splitting     :mod:`labcore.experiments.splitting`        one big memory vs S small ones
03_virtual_memory      :mod:`labcore.experiments.virtual_memory`   virtual value expansion E
04_architectures       :mod:`labcore.experiments.architectures`    Dense / MoE / PKM / UltraMem
05_paper_table         :mod:`labcore.experiments.paper_table`      Table 2, one switch at a time
=====================  ==========================================  ==============================

Shared machinery: :mod:`labcore.experiments.core` (variants x seeds -> table, statistics),
:mod:`labcore.experiments.common` (parameter schema, sizes, run directory),
:mod:`labcore.viz.figures` (their figures, with seed spread).
"""
