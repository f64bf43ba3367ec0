"""Lazy AdamW for memory value tables: update only the rows a step touched.

A PKM / UltraMem value table has N rows (docs/notation.md) and one training step reads at most
``tokens * H * K`` of them, yet ``torch.optim.AdamW`` reads and writes the parameter, its gradient
and both moments of *every* row on every step. The PKM authors' code (XLM ``--mem_sparse``,
arXiv 1907.05242; docs/implementations.md "PKM") asks the value ``EmbeddingBag`` for a sparse
gradient and steps it with ``torch.optim.SparseAdam`` (``--mem_values_optimizer sparseadam,lr=...``;
no weight decay). :class:`LazyAdamW` does the same for any
group marked ``lazy=True`` and runs ``torch.optim.AdamW``'s own update on every other group, so one
optimiser object serves the whole model and its ``param_groups`` (``lr``, ``base_lr``, ``lr_role``)
keep working with ``labcore.lm.optim.apply_value_lr`` (the value-LR multiplier and its decay).

Update of a touched row r of a lazy parameter at a step with learning rate lr (AdamW, decoupled
weight decay lambda; arXiv 1711.05101 Alg. 2)::

    t_r      <- t_r + 1                                     row step count (see bias correction)
    m_r      <- beta1 * m_r + (1 - beta1) * g_r
    v_r      <- beta2 * v_r + (1 - beta2) * g_r^2
    w_r      <- w_r * (1 - lr * lambda)                     lazy decay: touched rows only
    w_r      <- w_r - lr / (1 - beta1^t) * m_r / (sqrt(v_r) / sqrt(1 - beta2^t) + eps)

Rows not touched keep their value, moments and count: their moments are *not* decayed and their
weights are *not* shrunk by weight decay until they are touched again ("lazy moments", "lazy decay",
as in ``torch.optim.SparseAdam``). A row touched on every step follows torch AdamW exactly.

Touched rows: for a sparse COO gradient the rows of its coalesced indices (the PKM and UltraMem
layers give one over the rows a step read when ``labcore.layers.base.set_sparse_value_grads`` is on,
which ``labcore.lm.train.build_optimizer`` does for ``optimizer="lazy_adamw"``); for a dense gradient
the rows with at least one non-zero entry (a row whose gradient is exactly zero counts as untouched,
so it also skips weight decay).

Bias correction, ``bias_correction=``:

* ``"row"`` (default): t = the row's own number of updates (``t_r``). A row's first update moves it
  by about lr, as Adam's first step does, however late the row is first touched.
* ``"global"``: t = the number of steps the *parameter* had a gradient (``torch.optim.SparseAdam``,
  hence XLM's PKM). A row first touched at a late step then gets ``m = (1 - beta1) g``,
  ``v = (1 - beta2) g^2`` with corrections near 1: a first move of about
  lr * (1 - beta1) / sqrt(1 - beta2) (3.2 lr at betas (0.9, 0.999), 0.45 lr at (0.9, 0.95)).

State per lazy parameter: ``step`` (float32 scalar, as torch AdamW), ``exp_avg``, ``exp_avg_sq``
(shape of the table) and ``row_step`` (int64, (N,)). A state loaded from a torch AdamW checkpoint
(no ``row_step``) starts every row's count at the parameter's ``step``.

Costs: the dense-gradient path reads the whole gradient once to find the touched rows; on a GPU
finding them (``nonzero``, ``coalesce``) syncs with the host once per table. Three scratch buffers of
(touched rows, F) per table are kept between steps (CPU allocations of that size page-fault on every
step otherwise). ``clip_grad_norm_`` here takes sparse gradients (torch's does not) and
``row_chunks`` gives a chunked view of a table (UltraMem's per-core read) that passes them back.

Use ``build_lazy_adamw(model, lr, weight_decay, ...)`` (value tables lazy, everything else torch
AdamW), or ``LazyAdamW(mark_lazy(labcore.lm.optim.build_param_groups(...)))``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim.adamw import adamw as torch_adamw

from labcore.config import ConfigError, check_choice, check_float
from labcore.lm.optim import VALUE_ROLE, build_param_groups

BIAS_CORRECTIONS = ("row", "global")


def _param_name(group: dict[str, Any], i: int, gi: int) -> str:
    names = group.get("param_names")
    if names is not None and i < len(names):
        return str(names[i])
    return f"param_groups[{gi}]['params'][{i}]"


class LazyAdamW(torch.optim.Optimizer):
    """AdamW whose ``lazy=True`` groups update only the rows touched by the step's gradient.

    ``params``: parameters, ``(name, parameter)`` pairs or group dicts (torch's forms). A group's
    ``lazy`` (default ``True``) selects the row-wise update; ``lazy=False`` groups get exactly
    ``torch.optim.AdamW``'s update (``foreach`` / ``fused`` passed through to it). Lazy parameters
    must be floating 2-D tables (rows x features). ``bias_correction``: ``"row"`` or ``"global"``
    (module docstring). No amsgrad / maximize.
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.01, *, bias_correction: str = "row",
                 foreach: bool | None = None, fused: bool | None = None) -> None:
        check_float("LazyAdamW", "lr", lr, min_value=0.0)
        if not (isinstance(betas, Sequence) and len(betas) == 2):
            raise ConfigError(f"LazyAdamW: betas={betas!r} is not allowed: must be a pair (beta1, beta2)")
        for i, b in enumerate(betas):
            check_float("LazyAdamW", f"betas[{i}]", b, min_value=0.0)
            if b >= 1.0:
                raise ConfigError(f"LazyAdamW: betas[{i}]={b!r} is not allowed: must be in [0, 1)")
        check_float("LazyAdamW", "eps", eps, min_value=0.0)
        check_float("LazyAdamW", "weight_decay", weight_decay, min_value=0.0)
        check_choice("LazyAdamW", "bias_correction", bias_correction, BIAS_CORRECTIONS)
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, lazy=True,
                        bias_correction=bias_correction, foreach=foreach, fused=fused)
        self._scratch: dict[Tensor, Tensor] = {}
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        gi = len(self.param_groups) - 1
        group = self.param_groups[gi]
        check_choice("LazyAdamW", f"param_groups[{gi}]['bias_correction']", group["bias_correction"],
                     BIAS_CORRECTIONS)
        if not isinstance(group["lazy"], bool):
            raise ConfigError(f"LazyAdamW: param_groups[{gi}]['lazy']={group['lazy']!r} is not allowed: "
                              "must be True or False")
        if group["lazy"]:
            for i, p in enumerate(group["params"]):
                if p.dim() != 2 or not p.is_floating_point() or p.layout != torch.strided:
                    raise ConfigError(
                        f"LazyAdamW: lazy parameter {_param_name(group, i, gi)} has shape {tuple(p.shape)}, "
                        f"dtype {p.dtype}, layout {p.layout}; a lazy group allows only dense floating 2-D "
                        "tables (rows x features): put it in a group with lazy=False")

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_scratch", {})
        for group in self.param_groups:
            for key, value in (("lazy", True), ("bias_correction", "row"), ("foreach", None), ("fused", None)):
                group.setdefault(key, value)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        for state in self.state.values():              # torch casts every state tensor to the param dtype
            if "row_step" in state:
                state["row_step"] = state["row_step"].to(torch.int64)

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D102 - torch.optim.Optimizer.step
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for gi, group in enumerate(self.param_groups):
            if group["lazy"]:
                self._lazy_group(group, gi)
            else:
                self._dense_group(group, gi)
        return loss

    # -- torch AdamW on a dense group --------------------------------------------------------------

    def _dense_group(self, group: dict[str, Any], gi: int) -> None:
        params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
        for i, p in enumerate(group["params"]):
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise ConfigError(f"LazyAdamW: parameter {_param_name(group, i, gi)} has a sparse gradient "
                                  "in a group with lazy=False; mark its group lazy=True")
            state = self.state[p]
            if not state:                      # the state torch.optim.AdamW creates, so checkpoints match
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            params.append(p)
            grads.append(p.grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
        if not params:
            return
        beta1, beta2 = group["betas"]
        torch_adamw(params, grads, exp_avgs, exp_avg_sqs, [], steps, foreach=group["foreach"],
                    fused=group["fused"], amsgrad=False, beta1=beta1, beta2=beta2, lr=group["lr"],
                    weight_decay=group["weight_decay"], eps=group["eps"], maximize=False)

    # -- the lazy row update ----------------------------------------------------------------------

    def _lazy_group(self, group: dict[str, Any], gi: int) -> None:
        beta1, beta2 = group["betas"]
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        for i, p in enumerate(group["params"]):
            if p.grad is None:
                continue
            grad = p.grad.coalesce() if p.grad.is_sparse else p.grad   # sums duplicate rows
            rows = touched_rows(grad, p, _param_name(group, i, gi))                  # (R,)
            state = self.state[p]
            if not state:
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if "row_step" not in state:        # fresh, or loaded from a torch AdamW checkpoint
                state["row_step"] = torch.full((p.shape[0],), int(state["step"]), dtype=torch.int64,
                                               device=p.device)
            state["step"] += 1
            if rows.numel() == 0:
                continue
            g, m, v = self._workspace(p, rows.numel())                             # (R, F) each
            if grad.is_sparse:
                g.copy_(grad.values())
            else:
                torch.index_select(grad, 0, rows, out=g)
            torch.index_select(state["exp_avg"], 0, rows, out=m)
            torch.index_select(state["exp_avg_sq"], 0, rows, out=v)
            row_step = state["row_step"].index_select(0, rows) + 1                 # (R,)
            state["row_step"].index_copy_(0, rows, row_step)
            m.lerp_(g, 1 - beta1)                                   # m <- beta1 m + (1 - beta1) g
            v.mul_(beta2).addcmul_(g, g, value=1 - beta2)           # v <- beta2 v + (1 - beta2) g^2
            state["exp_avg"].index_copy_(0, rows, m)
            state["exp_avg_sq"].index_copy_(0, rows, v)
            if group["bias_correction"] == "row":
                t = row_step.to(torch.float64)[:, None]                             # (R, 1)
            else:
                t = state["step"].to(device=p.device, dtype=torch.float64)
            bc1 = 1 - torch.pow(beta1, t)                           # float64, as torch's Python floats
            bc2_sqrt = (1 - torch.pow(beta2, t)).sqrt()
            denom = v.sqrt_().div_(bc2_sqrt.to(p.dtype)).add_(eps)  # sqrt(v) / sqrt(1 - beta2^t) + eps
            update = m.mul_((-lr / bc1).to(p.dtype)).div_(denom)    # addcdiv's order: (value * m) / denom
            if wd != 0:
                w = torch.index_select(p, 0, rows, out=g)
                w.mul_(1 - lr * wd).add_(update)                    # decoupled decay, touched rows only
                p.index_copy_(0, rows, w)
            else:
                p.index_add_(0, rows, update)                       # rows are unique: one add per entry

    def _workspace(self, p: Tensor, n_rows: int) -> tuple[Tensor, Tensor, Tensor]:
        """Three (n_rows, F) scratch buffers, kept between steps (not in the state dict): fresh
        buffers of this size cost page faults on the CPU every step."""
        buf = self._scratch.get(p)
        if buf is None or buf.shape[1] < n_rows or buf.dtype != p.dtype or buf.device != p.device:
            buf = torch.empty(3, max(n_rows, min(p.shape[0], n_rows + n_rows // 4)), p.shape[1],
                              dtype=p.dtype, device=p.device)
            self._scratch[p] = buf
        return buf[0, :n_rows], buf[1, :n_rows], buf[2, :n_rows]


def touched_rows(grad: Tensor, p: Tensor, name: str = "parameter") -> Tensor:
    """The rows a gradient of the 2-D table ``p`` touches (sorted, unique, int64, on ``p``'s device):
    the indices of a *coalesced* sparse COO gradient, or the rows of a dense gradient with a
    non-zero entry."""
    if tuple(grad.shape) != tuple(p.shape):
        raise ConfigError(f"LazyAdamW: gradient of {name} has shape {tuple(grad.shape)}; must be "
                          f"{tuple(p.shape)}")
    if grad.is_sparse:
        if grad.sparse_dim() != 1 or not grad.is_coalesced():
            raise ConfigError(f"LazyAdamW: sparse gradient of {name} must be coalesced with sparse_dim 1 "
                              f"(whole rows, as F.embedding_bag(..., sparse=True) gives after .coalesce()); "
                              f"got sparse_dim {grad.sparse_dim()}, coalesced {grad.is_coalesced()}")
        return grad.indices()[0]
    if grad.layout != torch.strided:
        raise ConfigError(f"LazyAdamW: gradient of {name} has layout {grad.layout}; must be strided or sparse_coo")
    return grad.ne(0).any(dim=1).nonzero().squeeze(1)                                  # (R,)


def mark_lazy(groups: list[dict[str, Any]], roles: Sequence[str] = (VALUE_ROLE,)) -> list[dict[str, Any]]:
    """Copies of ``labcore.lm.optim.build_param_groups`` groups with ``lazy`` set: True for the groups
    whose ``lr_role`` is in ``roles`` (the memory value tables by default), False otherwise."""
    return [{**g, "lazy": g.get("lr_role") in roles} for g in groups]


def build_lazy_adamw(model: nn.Module, lr: float, weight_decay: float, *, value_lr: float | None = None,
                     value_weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.999),
                     eps: float = 1e-8, bias_correction: str = "row", fused: bool | None = None) -> LazyAdamW:
    """One optimiser for ``model``: value tables (role ``memory_values``) lazy, every other parameter
    torch AdamW; groups (and ``base_lr`` / ``lr_role``) as ``labcore.lm.optim.build_param_groups``.
    Group entries carry ``param_names`` so errors name the parameter."""
    groups = mark_lazy(build_param_groups(model, lr, weight_decay, value_lr=value_lr,
                                          value_weight_decay=value_weight_decay))
    names = {}
    for n, p in model.named_parameters():
        names.setdefault(p, n)
    for g in groups:
        g["param_names"] = [names[p] for p in g["params"]]
    return LazyAdamW(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                     bias_correction=bias_correction, fused=fused)


@torch.no_grad()
def clip_grad_norm_(params: Iterable[Tensor], max_norm: float) -> Tensor:
    """``torch.nn.utils.clip_grad_norm_`` (2-norm) that also takes sparse COO gradients, which torch's
    refuses. Sparse gradients are coalesced in place (``p.grad`` is replaced), so the norm counts
    each row once and the optimiser gets them coalesced. Returns the total norm before clipping."""
    check_float("clip_grad_norm_", "max_norm", max_norm, min_value=0.0, min_inclusive=False)
    grads = []
    for p in params:
        if p.grad is None:
            continue
        if p.grad.is_sparse:
            p.grad = p.grad.coalesce()
        grads.append(p.grad)
    if not grads:
        return torch.tensor(0.0)
    norms = [torch.linalg.vector_norm(g.values() if g.is_sparse else g) for g in grads]
    total = torch.linalg.vector_norm(torch.stack([n.to(norms[0].device) for n in norms]))
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for g in grads:
        (g.values() if g.is_sparse else g).mul_(coef.to(g.device, g.dtype))   # values: stays coalesced
    return total


class _RowChunks(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight: Tensor, n_chunks: int) -> Tensor:
        ctx.shape, ctx.n_chunks = weight.shape, n_chunks
        n_rows, d = weight.shape
        return weight.view(n_rows * n_chunks, d // n_chunks)

    @staticmethod
    def backward(ctx, grad: Tensor):
        n_rows, d = ctx.shape
        h = ctx.n_chunks
        if not grad.is_sparse:
            return grad.reshape(n_rows, d), None
        grad = grad.coalesce()
        chunk = grad.indices()[0]                                           # (nnz,) chunk row = r * h + j
        vals = grad.values()                                                # (nnz, d / h)
        wide = vals.new_zeros(vals.shape[0], h, d // h)                    # (nnz, h, d / h)
        wide[torch.arange(vals.shape[0], device=vals.device), chunk % h] = vals
        out = torch.sparse_coo_tensor((chunk // h)[None], wide.view(-1, d), (n_rows, d), check_invariants=False)
        return out.coalesce(), None


def row_chunks(weight: Tensor, n_chunks: int) -> Tensor:
    """``weight.view(N * n_chunks, F / n_chunks)`` (UltraMem's per-core value chunks, arXiv 2411.12364
    §3.3) whose backward also passes a sparse COO gradient (``F.embedding_bag(..., sparse=True)``
    over the chunks) back as a sparse (N, F) gradient; a plain ``view`` cannot (torch has no sparse
    reshape). Dense gradients pass through unchanged."""
    if weight.dim() != 2 or weight.shape[1] % n_chunks != 0:
        raise ConfigError(f"row_chunks: weight of shape {tuple(weight.shape)} cannot be split into "
                          f"n_chunks={n_chunks} equal column chunks")
    return _RowChunks.apply(weight, n_chunks)
