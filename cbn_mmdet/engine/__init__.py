"""mmengine glue: the burn-in hook and the statistics-error hook."""
from .hooks import (CBNBurnInHook, cbn_layers, compiles, config_uses_cbn, eval_mode_layers, ohem_heads_with_cbn,
                    resolve_auto_window)
from .stats_hook import CBNStatsErrorHook

__all__ = ['CBNBurnInHook', 'CBNStatsErrorHook', 'cbn_layers', 'compiles', 'config_uses_cbn', 'eval_mode_layers',
           'ohem_heads_with_cbn', 'resolve_auto_window']
