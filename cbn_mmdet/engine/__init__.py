"""mmengine glue: the burn-in hook and the statistics-error hook."""
from .hooks import CBNBurnInHook, cbn_layers, config_uses_cbn, resolve_auto_window
from .stats_hook import CBNStatsErrorHook

__all__ = ['CBNBurnInHook', 'CBNStatsErrorHook', 'cbn_layers', 'config_uses_cbn', 'resolve_auto_window']
