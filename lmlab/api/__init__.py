"""lmlab from Python: what `import lmlab` names (`lmlab.prepare`, `lmlab.train`, `lmlab.Run`, `lmlab.compare`,
`lmlab.UserError`; docs/reference/api.md), and what the commands are built on. Each module is imported when one of
its names is first used (the package's `__getattr__`), so `import lmlab` and the command line start without torch."""
