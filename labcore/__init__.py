"""UltraMem Lab core: faithful, readable reference layers for sparse memory research.

labcore holds everything the lab's notebooks call: the layers (dense FFN, MoE, PKM, UltraMem and
its ablation switches), a small decoder LM with a sparse-layer plan, budgets, data generators,
training and evaluation, profiling and the inference-cost model, the sweep runner and its report.

Notation (one table for the whole package; code comments, docstrings and figures use it)
-----------------------------------------------------------------------------------------
====  ===========================================================================
B     batch size (sequences, or decode-step tokens in the inference benchmark)
T     tokens per sequence
D     model (residual stream) dimension
E     number of experts (MoE) or value-expansion factor (UltraMem IVE)
K     top-k: experts per token (MoE) or selected values per head (PKM/UltraMem)
H     heads (memory query heads or attention heads, named where ambiguous)
N     number of value slots (physical) in a memory; n = sqrt(N) sub-keys per side
R     Tucker rank of the UltraMem core
====  ===========================================================================

Secondary symbols: D_k key dim, D_v value dim, I expert/FFN hidden dim, h number of Tucker cores
(multi-core scoring), m candidates per side in the product-key search, L number of blocks.
Token inputs of every layer may be ``(B, T, D)`` or ``(N_tok, D)``; records flatten tokens to
``N_tok = B*T``.
"""

__version__ = "0.1.0"
