"""Any `torch.nn.Module`: every submodule's output is a hook point named by its module path."""

from ..hooks import HookPoint


def hook_points(model):
    for path, module in model.named_modules():
        if path:
            yield HookPoint(path, module, "output")
