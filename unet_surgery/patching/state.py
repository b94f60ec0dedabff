"""What a patch owns besides its layers: per-pass state slots and named model hooks.

In the manner of diffusers' ``HookRegistry``/``StateManager`` and PEFT's ``BaseTuner``, the
framework, not the passes, owns everything a pass keeps between calls: a pass handler asks
its :class:`~unet_surgery.patching.patch.Patch` for a slot (one per pass of the recipe and
per guidance branch) and registers model-level hooks by name. Both are created by the patch
and cleared by ``Patch.remove()``, so no pass keeps module-level state and two patches (or
two passes of one type in one recipe) never share any.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from unet_surgery.errors import SurgeryError
from unet_surgery.runtime import MAIN


class PatchState:
    """State slots of one patch: ``slot(owner, branch)`` is a dict, created on first use.

    ``owner`` is a pass's index in the recipe (state of that pass) or a pass type (state the
    passes of a type share); ``branch`` a guidance branch (``MAIN``, ``DAMPED``). A deep copy
    of a patched model starts with empty slots (a seeded generator starts again from its seed).
    """

    def __init__(self) -> None:
        self._slots: dict[tuple[Hashable, str], dict[str, Any]] = {}
        self._lock = threading.Lock()

    def slot(self, owner: Hashable, branch: str = MAIN) -> dict[str, Any]:
        """The state dict of ``owner`` in ``branch`` (the same dict on every call)."""
        with self._lock:
            return self._slots.setdefault((owner, branch), {})

    def clear(self) -> None:
        with self._lock:
            self._slots.clear()

    def __len__(self) -> int:
        return len(self._slots)

    def __deepcopy__(self, memo: dict[int, Any]) -> PatchState:
        return PatchState()


PreHook = Callable[[nn.Module, tuple[Any, ...], dict[str, Any]], Any]
PostHook = Callable[[nn.Module, tuple[Any, ...], dict[str, Any], Any], Any]


class ModelHooks:
    """Named forward hooks on the patched model (and its submodules), removed together by ``Patch.remove()``.

    Hooks run eagerly (``torch.compiler.disable``): they read values such as the timestep,
    and a compiled forward then guards on what they decide only. Post hooks are
    ``always_call``, so state a pre hook set is released even when the forward raises.
    Hooks run in the order they were added.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._handles: dict[str, list[RemovableHandle]] = {}

    def add(self, name: str, *, pre: PreHook | None = None, post: PostHook | None = None) -> None:
        """Register ``pre`` (may return new ``(args, kwargs)``) and/or ``post`` (may return a new output)."""
        if name in self._handles:
            raise SurgeryError(f"a model hook named {name!r} is already registered on this patch")
        handles = []
        if pre is not None:
            handles.append(self.model.register_forward_pre_hook(_Eager(pre), with_kwargs=True))
        if post is not None:
            handles.append(self.model.register_forward_hook(_Eager(post), with_kwargs=True, always_call=True))
        self._handles[name] = handles

    def add_many(self, name: str, pre_hooks: list[tuple[nn.Module, PreHook]]) -> None:
        """Register forward pre hooks (with kwargs) on submodules of the model, together as ``name``."""
        if name in self._handles:
            raise SurgeryError(f"a model hook named {name!r} is already registered on this patch")
        self._handles[name] = [module.register_forward_pre_hook(_Eager(hook), with_kwargs=True)
                               for module, hook in pre_hooks]

    def remove(self, name: str) -> None:
        """Remove the hooks registered as ``name`` (no-op if none)."""
        for handle in self._handles.pop(name, []):
            handle.remove()

    def names(self) -> list[str]:
        return list(self._handles)

    def __contains__(self, name: object) -> bool:
        return name in self._handles

    def clear(self) -> None:
        for name in reversed(list(self._handles)):
            self.remove(name)


class _Eager:
    """A hook run outside any compiled graph. An object holding the hook (a bound method), not
    a closure, so ``copy.deepcopy`` of the model gives hooks bound to the copy's patch."""

    __slots__ = ("fn",)

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn

    @torch.compiler.disable
    def __call__(self, *args: Any) -> Any:
        return self.fn(*args)
