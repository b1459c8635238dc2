"""Jobs: one module per method (stages + evaluation + report), called by the thin entry points."""
