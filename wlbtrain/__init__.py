"""wlbtrain: LLM training with 4D parallelism that balances packed variable-length documents."""

import importlib.abc
import importlib.util
import os
import sys

__version__ = "0.1.0"

# The Triton kernels live in the checkout's top-level `kernels/` and are installed as
# `wlbtrain.kernels` (pyproject's package-dir). A wheel puts them inside this package; run from a
# checkout (PYTHONPATH, or an editable install whose finder misses mapped subpackages, as some
# setuptools versions' do) they sit beside it. This finder, consulted only after the normal ones
# fail, makes `import wlbtrain.kernels` work the same in both layouts.
_CHECKOUT_KERNELS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                 "kernels")


class _CheckoutKernelsFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "wlbtrain.kernels":
            return None
        return importlib.util.spec_from_file_location(
            name, os.path.join(_CHECKOUT_KERNELS, "__init__.py"),
            submodule_search_locations=[_CHECKOUT_KERNELS])


if (os.path.isfile(os.path.join(_CHECKOUT_KERNELS, "__init__.py"))
        and not any(isinstance(f, _CheckoutKernelsFinder) for f in sys.meta_path)):
    sys.meta_path.append(_CheckoutKernelsFinder())
