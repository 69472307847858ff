"""Find the first layer where two implementations of the same network disagree.

Both models run on the same input with forward hooks on every named sub-module. Modules are paired by
name -- ours are named like the checkpoint keys, which are the reference's module names -- and the
report lists, in execution order, how far apart each pair's outputs are and the first one beyond the
tolerance. When logits differ, that first row says where to look (``model.layers.3.mlp.up_proj``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = ["ModuleDiff", "ComparisonReport", "compare_models", "capture_outputs"]


@dataclass
class ModuleDiff:
    """How one module's output differs between the two models."""

    name: str
    shape: tuple[int, ...]
    max_abs: float
    mean_abs: float
    max_rel: float
    ok: bool
    note: str = ""


@dataclass
class ComparisonReport:
    """All compared modules in execution order, and which is the first to differ."""

    rows: list[ModuleDiff]
    atol: float
    rtol: float
    only_in_ours: list[str] = field(default_factory=list)
    only_in_reference: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.rows)

    @property
    def first_mismatch(self) -> ModuleDiff | None:
        return next((r for r in self.rows if not r.ok), None)

    @property
    def first_layer(self) -> int | None:
        """Index N of the first mismatching ``...layers.N...`` module, if any."""
        row = self.first_mismatch
        if row is None:
            return None
        parts = row.name.split(".")
        for i, part in enumerate(parts[:-1]):
            if part in ("layers", "h") and parts[i + 1].isdigit():
                return int(parts[i + 1])
        return None

    def table(self, only_mismatches: bool = False) -> str:
        rows = [r for r in self.rows if not (only_mismatches and r.ok)]
        width = max([len("module"), *(len(r.name) for r in rows)])
        head = f"{'module':<{width}}  {'shape':<18} {'max|diff|':>10} {'mean|diff|':>10} {'max rel':>9}  ok"
        lines = [head, "-" * len(head)]
        for r in rows:
            shape = "x".join(map(str, r.shape))
            lines.append(f"{r.name:<{width}}  {shape:<18} {r.max_abs:>10.3g} {r.mean_abs:>10.3g} {r.max_rel:>9.3g}  "
                         f"{'yes' if r.ok else 'NO'}{'  ' + r.note if r.note else ''}")
        return "\n".join(lines)

    def __str__(self) -> str:
        first = self.first_mismatch
        if first is None:
            summary = f"all {len(self.rows)} compared modules match (atol={self.atol:g}, rtol={self.rtol:g})"
        else:
            summary = (f"first mismatch: {first.name} (max |diff| {first.max_abs:.3g}, atol={self.atol:g}, "
                       f"rtol={self.rtol:g}); {sum(not r.ok for r in self.rows)} of {len(self.rows)} modules differ")
        return summary + "\n" + self.table()


def _first_tensor(output: Any) -> torch.Tensor | None:
    """The tensor a module produced (the first one, for modules that return tuples or dataclasses)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, tuple | list):
        for item in output:
            found = _first_tensor(item)
            if found is not None:
                return found
        return None
    for attr in ("logits", "last_hidden_state"):
        value = getattr(output, attr, None)
        if isinstance(value, torch.Tensor):
            return value
    return None


def capture_outputs(model: nn.Module, run: Callable[[], Any], names: set[str] | None = None
                    ) -> dict[str, torch.Tensor]:
    """Run ``run()`` with hooks on ``model``'s sub-modules; return name -> output in execution order."""
    outputs: dict[str, torch.Tensor] = {}
    handles = []

    def hook(name: str) -> Callable[..., None]:
        def fn(module: nn.Module, args: Any, output: Any) -> None:
            tensor = _first_tensor(output)
            if tensor is not None and name not in outputs:  # first call only (e.g. prefill, not decode)
                outputs[name] = tensor.detach().float().cpu()
        return fn

    for name, module in model.named_modules():
        if name and (names is None or name in names):
            handles.append(module.register_forward_hook(hook(name)))
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    return outputs


def compare_models(ours: nn.Module, reference: nn.Module, input_ids: torch.Tensor, *,
                   atol: float = 1e-5, rtol: float = 1e-4,
                   name_map: Mapping[str, str] | Callable[[str], str | None] | None = None,
                   forward_kwargs: Mapping[str, Any] | None = None) -> ComparisonReport:
    """Run both models on ``input_ids`` and compare every pair of same-named sub-modules.

    ``name_map`` turns one of our module names into the reference's name (a dict or a function that
    returns ``None`` to skip a module); by default the names are expected to be equal, which holds
    for the Qwen2 layout. A module passes when ``|a - b| <= atol + rtol * |b|`` everywhere.
    """
    kwargs = dict(forward_kwargs or {})
    if name_map is None:
        mapping: Callable[[str], str | None] = lambda n: n
    elif isinstance(name_map, Mapping):
        mapping = name_map.get
    else:
        mapping = name_map
    ref_names = {n for n, _ in reference.named_modules() if n}
    our_names = [n for n, _ in ours.named_modules() if n]
    pairs = {n: m for n in our_names if (m := mapping(n)) is not None and m in ref_names}

    ref_device = next(reference.parameters()).device
    our_device = next(ours.parameters()).device
    ref_out = capture_outputs(reference, lambda: reference(input_ids.to(ref_device), **kwargs), set(pairs.values()))
    our_out = capture_outputs(ours, lambda: ours(input_ids.to(our_device), **kwargs), set(pairs))

    rows = []
    for name, tensor in our_out.items():  # execution order of our model
        ref_name = pairs[name]
        if ref_name not in ref_out:
            continue
        ref = ref_out[ref_name]
        label = name if ref_name == name else f"{name} <-> {ref_name}"
        if tensor.shape != ref.shape:
            rows.append(ModuleDiff(label, tuple(tensor.shape), float("inf"), float("inf"), float("inf"), False,
                                   note=f"shape {tuple(tensor.shape)} vs reference {tuple(ref.shape)}"))
            continue
        diff = (tensor - ref).abs()
        finite = torch.isfinite(diff)
        ok = bool(torch.all(diff <= atol + rtol * ref.abs()))
        rel = diff / ref.abs().clamp_min(1e-12)
        rows.append(ModuleDiff(label, tuple(tensor.shape), float(diff.max()) if diff.numel() else 0.0,
                               float(diff.mean()) if diff.numel() else 0.0,
                               float(rel.max()) if rel.numel() else 0.0, ok,
                               note="" if bool(finite.all()) else "non-finite values"))
    return ComparisonReport(
        rows=rows, atol=atol, rtol=rtol,
        only_in_ours=[n for n in our_names if n not in pairs],
        only_in_reference=sorted(ref_names - set(pairs.values())),
    )
