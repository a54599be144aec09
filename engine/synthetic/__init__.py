"""The synthetic motion benchmark, a plugin of the engine: importing it registers its DiT presets (`synthetic`,
`synthetic-i2v`), its data source (`data.source: synthetic`) and the checks of its data options. The runners import
it; nothing in engine/ does (.importlinter)."""

from engine.synthetic import dataset as _dataset  # noqa: F401  (registers the presets and the data source)
