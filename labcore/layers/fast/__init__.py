"""Speed machinery of the layers, kept out of the mechanism files; every function here computes
exactly what a readable line in a layer file says (up to floating-point summation order), and its
test compares it with that readable version. What each trick does, why it is exact and what it
measured: ``docs/performance.md``.

==============  ===============================================================================
module          what it makes fast
==============  ===============================================================================
topk.py         ``exact_topk``: top-k of float32 rows (the compiled ``topk_rows`` when built, else
                ``torch_exact_topk``: ranked as int32, block-maxima pre-selection)
compiled.py     the C++ extension (``csrc/``, built on first use, ``LABCORE_COMPILED=0`` disables it):
                ``topk_rows`` (exact per-row top-k, threshold from lane maxima), ``side_topk``
                (sub-key scores + top-k fused), ``pkm_topk`` and ``tucker_topk`` (PKM's and
                UltraMem's whole search in one pass, inference), ``bag_backward`` /
                ``sparse_bag_backward`` (the value read's backward in one pass, dense or sparse)
search.py       PKM's per-side search (``side_search``), token-chunked search, PKM's pruned candidate
                grid, the TDQKR search (signed, two-sided), and the fused searches of inference
                (``fused_pkm_search``, ``fused_tucker_search``, ``fused_search_ok``)
caches.py       ``DerivedCache``: parameter-derived tensors reused in inference while unchanged
bags.py         IVE value bags: sort / searchsorted into one ``embedding_bag`` call, permuted
                projection columns; ``weighted_bag`` (the read with the one-pass backward)
experts.py      the MoE expert paths: padded ``bmm`` groups (with their planner), ``grouped_mm``
                blocks, the per-expert loop
==============  ===============================================================================
"""
