"""mmengine glue: the burn-in hook."""
from .hooks import CBNBurnInHook, cbn_layers, config_uses_cbn

__all__ = ['CBNBurnInHook', 'cbn_layers', 'config_uses_cbn']
