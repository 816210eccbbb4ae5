"""Fake of ``mindspeed/patch_utils.py`` at ac9f0e74: the registration and application rules, rewritten.

Rules kept: patches keyed by the full dotted name; a callable whose ``__name__`` ends in ``wrapper`` or
``decorator`` is a wrapper (deduplicated by identity, applied in registration order, the last outermost, always
around the replacement); any other callable is the replacement, and a second one without ``force_patch`` raises
``RuntimeError('the patch of <attr> exist !')``; nothing is imported until ``apply_patches``; applying sets the
attribute on its owner (class or module) and rebinds every ``sys.modules`` attribute of the same name that is the
very object found at the owner; a registration after an apply re-applies from the original.
"""

import importlib
import sys
from typing import ClassVar


def _is_wrapper(fn):
    return getattr(fn, "__name__", "").endswith(("wrapper", "decorator"))


class Patch:
    def __init__(self, name, new_func):
        self.orig_module_name, self.orig_func_name = name.rsplit(".", 1)
        self.orig_module = None
        self.orig_func = None
        self.patch_func = None
        self.final_patch_func = None
        self.wrappers = []
        self.is_applied = False
        self.set_patch_func(new_func)

    def set_patch_func(self, new_func, force_patch=False):
        if _is_wrapper(new_func):
            if new_func not in self.wrappers:
                self.wrappers.append(new_func)
        else:
            if self.patch_func and not force_patch:
                raise RuntimeError(f"the patch of {self.orig_func_name} exist !")
            self.patch_func = new_func
        self.is_applied = False

    def _owner(self):
        parts = self.orig_module_name.split(".")
        for split in range(len(parts), 0, -1):
            try:
                owner = importlib.import_module(".".join(parts[:split]))
            except ModuleNotFoundError:
                continue
            for attr in parts[split:]:
                owner = getattr(owner, attr)
            return owner
        raise ModuleNotFoundError(self.orig_module_name)

    def apply_patch(self):
        if self.is_applied:
            return
        owner = self._owner()
        current = getattr(owner, self.orig_func_name, None)
        if self.orig_module is None:
            self.orig_module, self.orig_func = owner, current
        final = self.patch_func if self.patch_func is not None else self.orig_func
        for wrapper in self.wrappers:
            final = wrapper(final)
        setattr(owner, self.orig_func_name, final)
        for module in list(sys.modules.values()):
            if hasattr(module, self.orig_func_name) and getattr(module, self.orig_func_name) is current:
                setattr(module, self.orig_func_name, final)
        self.final_patch_func = final
        self.is_applied = True


class MindSpeedPatchesManager:
    patches_info: ClassVar[dict] = {}

    @staticmethod
    def register_patch(orig_func_name, new_func=None, force_patch=False, create_dummy=False):
        if orig_func_name not in MindSpeedPatchesManager.patches_info:
            MindSpeedPatchesManager.patches_info[orig_func_name] = Patch(orig_func_name, new_func)
        else:
            MindSpeedPatchesManager.patches_info[orig_func_name].set_patch_func(new_func, force_patch)

    @staticmethod
    def apply_patches():
        for patch in MindSpeedPatchesManager.patches_info.values():
            patch.apply_patch()
