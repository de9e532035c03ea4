"""The real executor: experts stream from a nested store into a budgeted pool, scheduled by
the same policy objects as the simulator, writing the same timeline rows."""
