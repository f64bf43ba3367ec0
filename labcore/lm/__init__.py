"""The language-model stack: a small decoder with a sparse-layer plan, its budgets, optimiser and training.

==============  ==============================================================================
module          what it holds
==============  ==============================================================================
model           :class:`~labcore.lm.model.ModelConfig`, :class:`~labcore.lm.model.SparsePlan`
                (dense / MoE / any registered memory layer at skip-layer placements "k:v"),
                :class:`~labcore.lm.model.LM`, layer splitting
budget          parameters, FLOPs and bytes per token of a config (no model built); matchers that
                size MoE and memory models to equal budgets; the equal-budget family
optim           parameter groups by role (weight decay by kind: "default" / "release"), the
                memory-value learning-rate factor, Memory+'s fixed value lr, retrieval refresh
calibrate       memory value tables rescaled to a stated output std at step 0 (default: the FFNs')
train/          the training loop, evaluation, checkpoints, history, the ``labcore train`` CLI
==============  ==============================================================================
"""
