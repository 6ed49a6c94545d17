"""Import the oracle, PyPI k-diffusion 0.0.15, without its evaluation-only dependencies.

`import k_diffusion` hard-imports torchvision, clip, clean-fid and resize_right, which only its FID/CLIP helpers use
(and whose wheels would replace the CPU torch). Each of those that fails to import is replaced by a stub module in
`sys.modules`; using a stubbed function raises.
"""

from __future__ import annotations

import importlib
import sys
import types

# Modules k_diffusion imports, parents before children, with the names it imports from each.
_STUBBED = (
    'torchvision',
    'torchvision.transforms',
    'torchvision.transforms.functional',
    'clip',
    'cleanfid',
    'cleanfid.inception_torchscript',
    'resize_right',
)


def _unavailable(name: str):
    def call(*args, **kwargs):
        raise RuntimeError(f'{name} is a test stub (the real package is not installed)')
    call.__name__ = name.rsplit('.', 1)[-1]
    return call


class _InceptionV3WStub:
    def __init__(self, *args, **kwargs):
        _unavailable('cleanfid.inception_torchscript.InceptionV3W')()


def _stub(name: str) -> types.ModuleType:
    module = types.ModuleType(name, f'test stub for {name}')
    if name == 'cleanfid.inception_torchscript':
        module.InceptionV3W = _InceptionV3WStub
    elif name == 'resize_right':
        module.resize = _unavailable('resize_right.resize')
    elif name == 'clip':
        module.load = _unavailable('clip.load')
    return module


def _ensure_importable(name: str):
    try:
        importlib.import_module(name)
        return
    except Exception:
        pass
    module = _stub(name)
    sys.modules[name] = module
    parent, _, child = name.rpartition('.')
    if parent:
        setattr(sys.modules[parent], child, module)


def import_k_diffusion():
    """The `k_diffusion` module (0.0.15), importing it with stubs for its evaluation-only dependencies."""
    if 'k_diffusion' not in sys.modules:
        for name in _STUBBED:
            _ensure_importable(name)
    return importlib.import_module('k_diffusion')
